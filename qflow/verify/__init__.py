"""Bit-exactness checks of deployed artifacts against the emulator."""
