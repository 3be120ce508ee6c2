"""`quantfw sensitivity input=DIR [sensitivity.budget=0.1] [sensitivity.wide=w8a8] [out=FILE.yaml]`:
mixed precision by measurement.

The float model in `input` runs on the recipe's calibration tokens one decoder layer at a time
(the same capture `quantize calibration.source=model` uses, `calibration.*` keys included); per MoE
layer, every expert is quantized with the recipe's scheme and with `sensitivity.wide` and its
squared output error against float is summed over its routed rows. The layers with the largest
error reduction per extra byte are widened while the extra routed-expert bytes stay within
`sensitivity.budget` (a fraction of the all-recipe-scheme bytes, as the format stores them).
Prints the plan and the `layers=` override; `out=FILE.yaml` writes the `layers:` recipe fragment,
`out=FILE.json` the whole plan.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from quantfw.api import components
from quantfw.errors import ConfigError


def _wide_scheme(cfg: DictConfig):
    """The scheme `sensitivity.wide` names, in the recipe's format."""
    from quantfw.config.compose import available
    from quantfw.config.layer_choice import resolve
    from quantfw.config.variants import running_config_dirs
    from quantfw.schemes.scheme import Scheme

    name = str(cfg.sensitivity.wide)
    known = available("scheme", running_config_dirs())
    if name not in known:
        raise ConfigError(f"sensitivity.wide: unknown scheme '{name}' (available: {', '.join(known)})")
    return Scheme.from_config(resolve({name: "sensitivity.wide"}, cfg.format.name)[name])


def override_text(fragment: dict) -> str:
    """{"layers": {"0-2": "w8a8"}} -> 'layers={0-2:w8a8}'."""
    return "layers={" + ",".join(f"{k}:{v}" for k, v in fragment["layers"].items()) + "}"


def run(cfg: DictConfig) -> dict:
    from quantfw.calibrate import sensitivity
    from quantfw.calibrate.equalize import apply_updown
    from quantfw.calibrate.model import calibrate_checkpoint
    from quantfw.io.experts import MoEModel
    from quantfw.io.reader import CheckpointReader

    if not cfg.input:
        raise ConfigError("sensitivity needs input=DIR (float HF checkpoint)")
    budget = float(cfg.sensitivity.budget)
    if budget < 0:
        raise ConfigError(
            f"sensitivity.budget={budget} (must be >= 0: a fraction of the routed-expert bytes)"
        )
    if cfg.out and Path(str(cfg.out)).suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"out={cfg.out}: expected a .yaml (recipe fragment) or .json (plan) file")
    scheme, fmt, backend = components(cfg)
    wide = _wide_scheme(cfg)
    fmt.check_compatible(wide)
    dims = MoEModel.from_reader(CheckpointReader(cfg.input), dict(cfg.model.proj_names)).dims()
    calib = OmegaConf.merge(cfg.calibration, {"progress": cfg.calibration.progress and cfg.progress})
    with tempfile.TemporaryDirectory(prefix="quantfw-sensitivity-") as work:
        result = calibrate_checkpoint(cfg.input, scheme, calib, cfg.seed, fmt, backend, work_dir=work)
        costs = []
        for layer, inputs in sorted(result.inputs.items()):
            scales = result.scales.get(layer)
            source = getattr(inputs, "inner", inputs).source

            def expert(e, source=source, inputs=inputs, scales=scales):
                w13, w2 = source.block(e, e + 1)
                if scales is not None:  # the recipe's equalization, as quantize applies it
                    w13, w2 = apply_updown(w13, w2, scales[e : e + 1])
                return w13[0], w2[0], inputs("w13", e)

            cost = sensitivity.measure_layer(
                layer, expert, dims.E, dims, (scheme, fmt, backend), (wide, fmt, backend)
            )
            costs.append(cost)
            if cfg.progress:
                print(
                    f"quantfw sensitivity: layer {layer}: error {cost.error_base:.4g} ({scheme.name}) vs "
                    f"{cost.error_wide:.4g} ({wide.name}), +{cost.extra_bytes} bytes",
                    file=sys.stderr,
                    flush=True,
                )
    if not costs:
        raise ConfigError(f"{cfg.input}: no MoE layer was calibrated (nothing to measure)")
    base_bytes = sum(c.bytes_base for c in costs)
    plan = sensitivity.plan_fragment(costs, int(budget * base_bytes), wide.name)
    plan.update(scheme=scheme.name, wide=wide.name, budget=budget, data=result.data.get("data"))
    chosen = plan["wide_layers"]
    print(
        f"{wide.name} for {len(chosen)} of {len(costs)} MoE layer(s) {chosen}: routed-expert bytes "
        f"{plan['base_bytes']:,} -> {plan['total_bytes']:,} (+{plan['extra_bytes'] / max(base_bytes, 1):.1%}, "
        f"budget +{budget:.1%}); summed output error {plan['error_base']:.4g} -> {plan['error_planned']:.4g}"
    )
    print(override_text(plan["fragment"]) if chosen else "no layer fits the budget: no `layers` override")
    if cfg.out:
        out = Path(str(cfg.out))
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".json":
            out.write_text(json.dumps(plan, indent=1))
        else:
            out.write_text(yaml.safe_dump(plan["fragment"], sort_keys=False))
        print(f"wrote {out}", file=sys.stderr)
    return plan
