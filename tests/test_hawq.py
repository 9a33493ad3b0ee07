"""HAWQ: Hutchinson traces against the exact Hessian, the allocation against brute force,
the config and its errors, and ``qflow quantize --method hawq`` through export and verify."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qflow.cli.main import main
from qflow.errors import ConfigError
from qflow.hawq import HAWQConfig, parse_budget
from qflow.hawq.choice import (
    LayerCosts,
    choose,
    pareto_front,
    reference_cost,
    tie,
    total,
    untie,
)
from qflow.hawq.sensitivity import hutchinson_traces, omega, quantization_errors


def _exact_traces(model: nn.Module, x, y) -> dict[str, float]:
    """Tr(H_i) of every weight from the full Hessian block, by autograd."""
    traces = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue

        def loss(weight, name=name):
            out = torch.func.functional_call(model, {f"{name}.weight": weight}, (x,))
            return F.cross_entropy(out, y)

        w = module.weight.detach()
        hessian = torch.autograd.functional.hessian(loss, w).reshape(w.numel(), w.numel())
        traces[name] = float(hessian.diagonal().sum())
    return traces


def test_hutchinson_matches_the_exact_hessian_trace():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    exact = _exact_traces(model, x, y)
    est = hutchinson_traces(model, x, y, tol=1e-2, rel_error=0.015, max_probes=20000)
    assert est.converged and sorted(est.traces) == sorted(exact) == ["0", "2"]
    for name, trace in exact.items():
        assert abs(est.traces[name] - trace) <= 0.05 * abs(trace), (name, est.traces, exact)
        assert abs(est.traces[name] - trace) <= 4 * est.errors[name]  # its error bar holds
    again = hutchinson_traces(model, x, y, tol=1e-2, rel_error=0.015, max_probes=20000)
    assert again == est  # seeded probes: deterministic
    other = hutchinson_traces(model, x, y, tol=1e-2, rel_error=0.015, max_probes=20000, seed=1)
    assert other.traces != est.traces


def test_hutchinson_input_traces_match_the_exact_hessian():
    """The trace of the Hessian with respect to each layer's input (what HAWQ weighs
    input widths by), against autograd's full Hessian of the loss in that input."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    h = torch.tanh(model[0](x)).detach()
    exact = {
        "0": torch.autograd.functional.hessian(lambda t: F.cross_entropy(model(t), y), x),
        "2": torch.autograd.functional.hessian(lambda t: F.cross_entropy(model[2](t), y), h),
    }
    exact = {k: float(v.reshape(t.numel(), t.numel()).diagonal().sum())
             for (k, v), t in zip(exact.items(), (x, h), strict=True)}
    est = hutchinson_traces(model, x, y, tol=1e-2, rel_error=0.015, max_probes=20000,
                            activations=True)
    assert est.converged and est.act_sizes == {"0": 128, "2": 192}
    for name, trace in exact.items():
        assert abs(est.act_traces[name] - trace) <= 0.05 * abs(trace), (name, est, exact)
        assert abs(est.act_traces[name] - trace) <= 4 * est.act_errors[name]
    plain = hutchinson_traces(model, x, y, max_probes=40)
    assert plain.act_traces == {}


def test_omega_and_quantization_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    from qflow.config import QFXConfig

    errors = quantization_errors(model, QFXConfig(), (2, 4, 8))
    assert errors["0"][2] > errors["0"][4] > errors["0"][8] > 0
    table = omega({"0": 3.0}, errors, {"0": 32})
    assert table["0"][4] == pytest.approx(3.0 / 32 * errors["0"][4])


def _random_layers(seed: int, n: int = 4) -> list[LayerCosts]:
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(n):
        widths = (2, 4, 8)
        sens = rng.uniform(0.1, 5)
        layers.append(LayerCosts(f"l{i}", {b: sens * 4.0 ** -b for b in widths},
                                 weights=int(rng.integers(10, 200)),
                                 macs=int(rng.integers(100, 5000)), input_bits=8))
    return layers


@pytest.mark.parametrize("seed", range(5))
def test_the_ilp_and_the_frontier_agree_with_brute_force(seed):
    layers = _random_layers(seed)
    configs = [dict(zip([la.name for la in layers], ws, strict=True))
               for ws in itertools.product(*(la.widths for la in layers))]

    def omega_of(widths):
        return sum(la.omega[widths[la.name]] for la in layers)

    for budget in ({"size": 0.5}, {"bops": 0.4}, {"size": 0.6, "bops": 0.45}):
        feasible = [w for w in configs if all(
            total(layers, w, q) <= f * reference_cost(layers, q) for q, f in budget.items())]
        best = min(omega_of(w) for w in feasible)
        chosen = choose(layers, budget)
        assert chosen in feasible and omega_of(chosen) == pytest.approx(best, rel=1e-9)
    front = pareto_front(layers, "size")
    for cost, value, widths in front:
        assert total(layers, widths, "size") == cost and omega_of(widths) == pytest.approx(value)
        # nothing cheaper or as cheap does better
        assert not any(total(layers, w, "size") <= cost and omega_of(w) < value - 1e-12
                       for w in configs)


@pytest.mark.parametrize("seed", [0, 1])
def test_tied_choice_agrees_with_brute_force(seed):
    layers = _random_layers(seed)
    names = [la.name for la in layers]
    groups = [names[:2]]  # the first two layers share a width
    configs = [w for w in (dict(zip(names, ws, strict=True))
                           for ws in itertools.product(*(la.widths for la in layers)))
               if w[names[0]] == w[names[1]]]
    budget = {"size": 0.55, "bops": 0.5}
    feasible = [w for w in configs if all(
        total(layers, w, q) <= f * reference_cost(layers, q) for q, f in budget.items())]
    best = min(sum(la.omega[w[la.name]] for la in layers) for w in feasible)
    chosen = untie(choose(tie(layers, groups), budget), groups)
    assert chosen in feasible
    assert sum(la.omega[chosen[la.name]] for la in layers) == pytest.approx(best, rel=1e-9)


def test_an_infeasible_budget_names_the_smallest_feasible_one():
    layers = _random_layers(0)
    smallest = sum(la.weights * 2 for la in layers) / reference_cost(layers, "size")
    with pytest.raises(ConfigError) as info:
        choose(layers, {"size": smallest * 0.9})
    message = str(info.value)
    assert message.startswith(f"budget size={smallest * 0.9:g} is infeasible")
    named = float(message.rsplit("size=", 1)[1])
    assert smallest <= named < smallest + 1e-3 and "\n" not in message
    choose(layers, {"size": named})  # the named budget is feasible


def test_config_round_trip_and_errors():
    cfg = HAWQConfig(widths=[8, 2, 4, 4], budget={"bops": 0.3, "size": 0.5},
                     overrides={r"conv\d": 6}, pin_first_last=False)
    assert cfg.widths == (2, 4, 8)
    assert HAWQConfig.from_json(cfg.to_json()) == cfg
    assert HAWQConfig.from_yaml(cfg.to_yaml()) == cfg
    assert cfg.pinned_width("conv1", False) == 6 and cfg.pinned_width("fc", True) is None
    assert HAWQConfig().pinned_width("fc", True) == 8
    assert parse_budget("size=0.6") == ("size", 0.6)
    assert parse_budget("dsp=300") == ("dsp", 300)
    for bad, message in ((["ff=3"], "QUANTITY=VALUE"), (["size=x"], "not a number"),
                         (["size=0"], "expected a fraction"), (["dsp=2.5"], "not an integer"),
                         (["lut=0"], "expected an integer from 1")):
        with pytest.raises(ConfigError, match=message):
            parse_budget(bad[0])
    for data, message in (({"widths": [1, 4]}, r"config\.widths\[\]"),
                          ({"budget": {"ff": 0.5}}, "unknown quantity 'ff'"),
                          ({"budget": {"dsp": 100}}, "a dsp budget needs an FPGA target"),
                          ({"reuse_factor": 0}, r"config\.reuse_factor"),
                          ({"overrides": {"fc": 40}}, r"config\.overrides\['fc'\]"),
                          ({"rel_error": 0}, r"config\.rel_error"),
                          ({"method": "qfx"}, "method")):
        with pytest.raises(ConfigError, match=message):
            HAWQConfig.from_dict(data)
    with pytest.raises(ConfigError, match="--bits: HAWQ chooses the weight widths"):
        HAWQConfig().replace_bits(4)
    assert HAWQConfig().replace_bits(act_bits=6).fixed.activation.bits == 6


def test_quantize_refuses_without_data():
    import qflow

    with pytest.raises(ConfigError, match="widths are chosen from data"):
        qflow.quantize_(nn.Sequential(nn.Linear(2, 2)), HAWQConfig())


def test_cli_refuses_bad_budgets_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "--method", "hawq", "--model", "digits-cnn", "--budget",
                 "size=0.1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    # every layer at 2 bits (the narrowest default) but the first and last (8): 22,144 of
    # 77,440 bits, 0.28595 rounded up
    assert err == ("qflow quantize: error: budget size=0.1 is infeasible: the smallest "
                   "configuration (every layer at its cheapest allowed width) needs size=0.286")
    assert not out.exists()
    assert main(["quantize", "--model", "digits-cnn", "--budget", "size=0.5",
                 "--out", str(out)]) == 2
    assert "--budget is for --method hawq" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hawq_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hawq") / "run"
    assert main(["quantize", "--method", "hawq", "--model", "digits-cnn", "--budget",
                 "size=0.6", "--epochs", "2", "--qat-epochs", "1", "--quiet",
                 "--out", str(run)]) == 0
    return run


def test_the_run_holds_the_chosen_qfx_config(hawq_run):
    report = json.loads((hawq_run / "hawq.json").read_text())
    config = json.loads((hawq_run / "config.json").read_text())
    assert config["method"] == "qfx"  # the chosen widths, as a QFX recipe
    overrides = {o["pattern"]: o["weight"]["bits"] for o in config["overrides"]}
    assert overrides == report["widths"]
    assert report["widths"]["stem"] == report["widths"]["fc"] == 8  # first and last pinned
    size = report["costs"]["size"]
    assert size["fraction"] <= 0.6 and size["budget"] == 0.6
    layers = {row["name"]: row for row in report["layers"]}
    assert size["chosen"] == sum(r["weights"] * r["bits"] for r in layers.values())
    assert size["reference_8bit"] == 8 * sum(r["weights"] for r in layers.values())
    assert report["hutchinson"]["probes"] >= 16
    assert all(r["trace"] > 0 for r in layers.values())
    # the chosen point is on the frontier's side of its budget and no uniform point at
    # or under the budget beats it
    under = [u for u in report["uniform"] if u["size"] <= 0.6]
    assert all(report["omega"] <= u["omega"] + 1e-12 for u in under)


@pytest.mark.parametrize("target", ["cpu", "ultra96"])
def test_hawq_run_exports_and_verifies(hawq_run, tmp_path, target):
    out = tmp_path / target
    assert main(["export", str(hawq_run), "--target", target, "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["mismatching_samples"] == 0
    rows = [r for r in report["results"] if r["role"] != "reference"]
    assert {r["artifact"] for r in rows} >= {
        "QAT model (torch eval)", "int_onnx", "hls_csim" if target == "ultra96" else "tvm"}
    for row in rows:
        assert (row["status"], row["mismatching_samples"]) == ("ok", 0), row
        assert row["samples"] == report["samples"] > 500, row


def test_cli_refuses_resource_budgets_it_cannot_meet(tmp_path, capsys):
    out = tmp_path / "run"
    for budget, message in (
            (["dsp=1", "--target", "ultra96"],
             "budget dsp=1 is infeasible: the smallest configuration (every layer at its "
             "cheapest allowed width) needs dsp="),
            (["latency=100", "--target", "ultra96"],
             "budget latency=100 is infeasible: the smallest configuration (every layer at its "
             "cheapest allowed width) needs latency="),  # the least, at reuse factor 1
            (["dsp=300", "--target", "cpu"],
             "--target cpu: a dsp budget needs an FPGA target (cpu is a cpu target)"),
            (["dsp=300"], "a dsp budget needs an FPGA target (--target, e.g. ultra96)")):
        assert main(["quantize", "--method", "hawq", "--model", "digits-cnn", "--budget",
                     *budget, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        if budget[0].startswith("latency"):  # named where the latency is least
            assert err.endswith("on ultra96 at reuse factor 1"), err
        assert not out.exists()


def test_dsp_and_latency_budgets_hold_in_the_exported_estimate(tmp_path):
    run = tmp_path / "run"
    assert main(["quantize", "--method", "hawq", "--model", "digits-cnn", "--budget",
                 "dsp=300", "--budget", "latency=4000", "--target", "ultra96", "--epochs",
                 "2", "--qat-epochs", "1", "--quiet", "--out", str(run)]) == 0
    resources = json.loads((run / "hawq.json").read_text())["resources"]
    dsp, latency = resources["dsp"], resources["latency"]
    assert latency["budget"] == 4000 and latency["chosen"] <= 4000
    assert dsp["budget"] == 300 and dsp["chosen"] <= 300 and dsp["target"] == "ultra96"
    out = tmp_path / "ultra96"
    assert main(["export", str(run), "--target", "ultra96", "--reuse",
                 str(dsp["reuse_factor"]), "--out", str(out)]) == 0
    estimate = json.loads((out / "report.json").read_text())["estimate"]
    assert estimate["settings"]["reuse_factor"] == dsp["reuse_factor"]
    assert estimate["totals"]["dsp"] <= 300
    assert estimate["totals"]["latency_cycles"] <= 4000
    # the other layers (BatchNorm scale_shift, ...) as HAWQ costed them
    weight_layers = {"stem", "conv1", "conv2", "conv3", "fc"}
    others = sum(row["dsp"] for row in estimate["layers"] if row["node"] not in weight_layers)
    assert others == dsp["other_layers"]


class UserNet(nn.Module):
    """Written as users write models: functional ReLU and flatten in forward, an unnamed
    Sequential inside."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Linear(8 * 16, 32), nn.ReLU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.head(F.relu(self.body(torch.flatten(x, 1))))


def test_allocation_on_a_user_model_quantizes_and_freezes_exactly():
    import qflow
    from qflow.hawq import allocate
    from qflow.train import calibrate

    torch.manual_seed(0)
    model = UserNet()
    x, y = torch.rand(128, 1, 4, 4), torch.randint(0, 4, (128,))
    plan = allocate(model, x, y, HAWQConfig(budget={"bops": 0.6}, max_probes=40))
    assert set(plan.widths) == {"conv", "body.0", "body.2", "head"}
    assert plan.widths["conv"] == plan.widths["head"] == 8  # forward order: first, last
    assert plan.report["costs"]["bops"]["fraction"] <= 0.6
    assert plan.widths["body.0"] < 8 or plan.widths["body.2"] < 8
    q = qflow.quantize_(model, plan.config)
    calibrate(q, x)
    q.eval()
    for name, bits in plan.widths.items():
        assert q.get_submodule(name).weight_quant.spec.bits == bits
    graph = qflow.freeze(q, x[:2])
    with torch.no_grad():
        expected = q(x).double().numpy() / graph.output_type.lsb
    assert int((qflow.emulate(graph, x.numpy()) != expected).any(axis=1).sum()) == 0


def test_input_widths_are_chosen_for_dyadic_layers_and_freeze_exactly():
    import qflow
    from qflow.hawq import allocate
    from qflow.train import calibrate

    with pytest.raises(ConfigError, match="act_widths: input widths per layer need requant"):
        HAWQConfig(act_widths=[4, 8])
    torch.manual_seed(0)
    model = UserNet()
    x, y = torch.rand(128, 1, 4, 4), torch.randint(0, 4, (128,))
    config = HAWQConfig(requant="dyadic", act_widths=[3, 4, 6], budget={"bops": 0.35},
                        max_probes=40)
    plan = allocate(model, x, y, config)
    assert plan.act_widths["conv"] == plan.act_widths["head"] == 8  # first, last: pinned
    assert {plan.act_widths["body.0"], plan.act_widths["body.2"]} <= {3, 4, 6}
    assert plan.report["costs"]["bops"]["fraction"] <= 0.35
    rows = {r["name"]: r for r in plan.report["layers"]}
    bops = sum(r["macs"] * r["bits"] * r["input_bits"] for r in rows.values())
    assert bops == plan.report["costs"]["bops"]["chosen"]
    assert all(r["input_trace"] > 0 for r in rows.values())
    q = qflow.quantize_(model, plan.config)
    for name in plan.widths:
        layer = q.get_submodule(name)
        assert (layer.bits, layer.act_bits) == (plan.widths[name], plan.act_widths[name])
    calibrate(q, x)
    q.eval()
    graph = qflow.freeze(q, x[:2])
    with torch.no_grad():
        expected = q(x).double().numpy() / graph.output_type.lsb
    assert int((qflow.emulate(graph, x.numpy()) != expected).any(axis=1).sum()) == 0


def test_tied_layers_share_a_width():
    from qflow.hawq import allocate

    torch.manual_seed(0)
    model = UserNet()
    x, y = torch.rand(128, 1, 4, 4), torch.randint(0, 4, (128,))
    plan = allocate(model, x, y, HAWQConfig(budget={"size": 0.45}, max_probes=40,
                                            tied=[["body\\..*"]]))
    assert plan.widths["body.0"] == plan.widths["body.2"] and plan.report["tied"] == [
        ["body.0", "body.2"]]
    untied = allocate(model, x, y, HAWQConfig(budget={"size": 0.45}, max_probes=40))
    assert untied.widths["body.0"] != untied.widths["body.2"]  # the tie changed the choice
    pinned = allocate(model, x, y, HAWQConfig(budget={"size": 0.9}, max_probes=40,
                                              tied=[["conv", "body.0"]]))
    assert pinned.widths["body.0"] == pinned.widths["conv"] == 8  # the first layer's pin
    for tied, message in (([["head"]], r"config.tied\[0\] matches 1 weight layer \(head\)"),
                          ([["conv", "head"], ["head", "body.0"]],
                           "layer head is in tied groups 0 and 1"),
                          ([["conv", "body.0"]], "tied layers conv, body.0 allow no common")):
        config = HAWQConfig(budget={"size": 0.9}, max_probes=40, tied=tied,
                            overrides={"body.0": 4} if "common" in message else {})
        with pytest.raises(ConfigError, match=message):
            allocate(model, x, y, config)
    with pytest.raises(ConfigError, match=r"config.tied\[0\]: expected a list of layer"):
        HAWQConfig(tied=["conv"])
