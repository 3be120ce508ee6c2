"""`quantfw quantize input=DIR output=DIR [scheme/format overrides] [overwrite=true]
[quantize.targets=[REGEX,...] quantize.ignore=[...]] [calibration.source=model calibration.tokens=N ...]`.

With a clipping scheme and `calibration.source=model`, the float model in `input` is run on
calibration tokens first and the learned per-expert alphas go into the checkpoint
(`...experts.e.down_proj.alpha`), with how they were obtained in the metadata's quantfw block.
With a data-driven weight observer (e.g. `scheme.weight_observer=gptq`) the same run captures each
expert's inputs and the observer uses them; its report is the quantfw block's `weight_calibration`.
Calibration runs one decoder layer at a time and keeps its spills and resume state in a hidden
sibling of the output, `<parent>/.<name>.calibration` (a killed run resumes there at the first
unfinished layer); it is removed once the checkpoint is written.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from quantfw.api import components
from quantfw.config.layer_choice import layer_schemes
from quantfw.errors import ConfigError, QuantfwError
from quantfw.parallel.calibration import ExpertShare
from quantfw.parallel.dist import Dist
from quantfw.quantize.checkpoint import quantize_checkpoint


def run(cfg: DictConfig) -> str:
    if not cfg.input or not cfg.output:
        raise ConfigError("quantize needs input=DIR (float HF checkpoint) and output=DIR")
    from quantfw.calibrate.smooth import check_quantize

    check_quantize(cfg.calibration)
    scheme, fmt, backend = components(cfg)
    source = cfg.calibration.source
    if source not in ("none", "model"):
        raise ConfigError(f"calibration.source={source} (allowed: none, model)")
    dist = Dist.from_env(cfg.get("dist_timeout_s"))
    try:
        return _run(cfg, scheme, fmt, backend, source, dist)
    finally:
        dist.close()


def _run(cfg, scheme, fmt, backend, source, dist: Dist) -> str:
    result = None
    from quantfw.calibrate.equalize import declared
    from quantfw.calibrate.model import calibrate_checkpoint, needs_calibration

    # One work dir for all ranks, written by rank 0 (beside the output: shared storage).
    work_dir = calibration_dir(cfg.output)
    if source == "model" and (needs_calibration(scheme) or declared(cfg.calibration)):
        try:
            calib = OmegaConf.merge(cfg.calibration, {"progress": cfg.calibration.progress and cfg.progress})
            result = calibrate_checkpoint(
                cfg.input,
                scheme,
                calib,
                cfg.seed,
                fmt=fmt,
                backend=backend,
                work_dir=work_dir,
                mtp=cfg.quantize.mtp,
                share=ExpertShare(dist, cfg.get("placement")),
            )
        except QuantfwError as e:
            if dist.rank == 0 and not getattr(e, "resumable", False):
                shutil.rmtree(work_dir, ignore_errors=True)  # bad input: nothing worth resuming
            raise
        if result.alphas:
            alphas, calibration = result.alphas, result.metadata
            fallback = calibration["fallback_experts"]
            if dist.rank == 0:
                print(
                    f"quantfw quantize: learned alphas for {len(alphas)} layer(s) from {calibration['data']}; "
                    f"{len(fallback)} expert(s) fell back to alpha = 1 (policy {calibration['policy']})",
                    file=sys.stderr,
                )
            guard = calibration.get("guard")
            if guard is not None and "skipped" not in guard:
                judged = len(guard["layers"])
                print(
                    f"quantfw quantize: guard ({guard['tokens']} tokens) kept the learned alphas of "
                    f"{len(guard['kept_layers'])} of {judged} clipped layer(s); the others use alpha = 1",
                    file=sys.stderr,
                )
        if dist.rank == 0:
            print(
                f"quantfw quantize: captured expert inputs of {len(result.inputs)} layer(s) from {result.data['data']}",
                file=sys.stderr,
            )
    elif source == "model":
        print(
            f"quantfw quantize: calibration.source=model ignored: scheme '{scheme.name}' neither clips "
            "nor uses a data-driven weight observer",
            file=sys.stderr,
        )
    from quantfw.engines.commands import quantize_linears, report_output

    targets, ignore = quantize_linears(cfg)
    out = quantize_checkpoint(
        cfg.input,
        cfg.output,
        scheme,
        fmt,
        overwrite=cfg.overwrite,
        proj_names=dict(cfg.model.proj_names),
        dist=dist,
        targets=targets,
        ignore=ignore,
        mtp=cfg.quantize.mtp,
        calibration=result,
        compute_dtype=cfg.quantize.compute_dtype,
        linear_scheme=cfg.quantize.linear_scheme,
        progress=cfg.progress,
        layers=layer_schemes(cfg),
    )
    if dist.rank == 0:  # every rank is past the converter's last barrier: nobody reads it any more
        shutil.rmtree(work_dir, ignore_errors=True)  # the checkpoint is written: nothing left to resume
        report_output(cfg, out)
    return str(out)


def calibration_dir(output: str) -> Path:
    """`<parent>/.<name>.calibration`, shared by every torchrun rank (rank 0 writes it)."""
    out = Path(output).resolve()
    return out.parent / f".{out.name}.calibration"
