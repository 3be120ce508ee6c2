"""`quantfw tour [out=DIR] [model=...] [format=...] [tokens=N] [eval.perplexity=false]`: the
newcomer's journey in one process on the running recipe (the embedded default with no arguments).

example (a float checkpoint of the recipe's model) -> quantize with every declared scheme the
recipe's format holds -> check each -> eval each against the float checkpoint -> one table.
Each step is that command's own `run(cfg)` on the config its command line would compose
(`quantfw quantize input=... output=... scheme=NAME` plus the tour's overrides), so the table's
numbers are the ones the separate commands print. A step's own output goes to `tour.log`; the
files go to a temporary folder removed at the end unless `out=DIR` keeps them.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from quantfw.cli.example import _check_out
from quantfw.cli.user_overrides import recipe_and_overrides
from quantfw.config.variants import running_config_dirs, running_hydra_kept
from quantfw.errors import CheckpointError, ConfigError

# Command -> the module whose run(cfg) it is (the command table's modules).
STEP_MODULES = {
    "example": "quantfw.cli.example",
    "quantize": "quantfw.cli.quantize",
    "check": "quantfw.cli.check",
    "eval": "quantfw.cli.evaluate",
}


@dataclass
class Row:
    scheme: str
    format: str
    folder: Path
    bytes: int = 0
    check: str = "-"
    eval: dict | None = None  # the eval command's document


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def _root(out: str | None) -> Iterator[Path]:
    """out=DIR (new or empty, kept) or a temporary folder removed at the end."""
    if out:
        root = _check_out(out)
        root.mkdir(parents=True, exist_ok=True)
        yield root
        return
    root = Path(tempfile.mkdtemp(prefix="quantfw-tour-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Journey:
    """Runs the steps in order: one line each on stderr, their own output into tour.log."""

    def __init__(self, recipe: str, base: Sequence[str], dirs: Sequence[str], root: Path, total: int):
        self.recipe, self.base, self.dirs, self.root, self.total = recipe, list(base), list(dirs), root, total
        self.done = 0
        # what the step's own command line would need besides the overrides (for tour.log)
        self.recipe_args = [
            *([f"recipe={recipe}"] if recipe != "default" else []),
            *(f"--config-dir={d}" for d in dirs),
        ]
        self.log = root / "tour.log"

    def compose(self, overrides: Sequence[str]) -> DictConfig:
        from quantfw.config.compose import compose

        with running_hydra_kept():
            return compose(self.recipe, [*self.base, *overrides], self.dirs)

    def step(
        self, command: str, what: str, where: Path, overrides: Sequence[str], cfg: DictConfig | None = None
    ):
        """Compose `quantfw COMMAND <tour overrides> OVERRIDES` (unless given) and run it."""
        from quantfw.config.bounds import check_memory

        cfg = cfg if cfg is not None else self.compose(overrides)
        check_memory(cfg, command)
        run = importlib.import_module(STEP_MODULES[command]).run
        captured = io.StringIO()
        start = time.perf_counter()
        try:
            with (
                running_hydra_kept(),
                contextlib.redirect_stdout(captured),
                contextlib.redirect_stderr(captured),
            ):
                result = run(cfg)
        except BaseException:
            self._finish(command, what, where, overrides, captured.getvalue(), start, failed=True)
            sys.stderr.write(captured.getvalue())  # what the command said before it failed
            raise
        self._finish(command, what, where, overrides, captured.getvalue(), start)
        return result

    def _finish(self, command, what, where, overrides, text: str, start: float, failed: bool = False) -> None:
        seconds = time.perf_counter() - start
        self._record(command, overrides, text)
        self.done += 1
        print(
            f"quantfw tour: [{self.done}/{self.total}] {command:<8} {what:<22} {where}  "
            f"{'FAILED after ' if failed else ''}{seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def _record(self, command: str, overrides: Sequence[str], text: str) -> None:
        with self.log.open("a") as f:
            line = shlex.join([command, *self.recipe_args, *self.base, *overrides])
            f.write(f"$ quantfw {line}\n{text}\n")


def _schemes(
    journey: Journey, float_dir: Path, seed: int
) -> tuple[list[tuple[Row, list[str], DictConfig]], list[str]]:
    """Every declared scheme (conf/scheme and the user's folders) with the quantize config that
    writes it in the recipe's format; a scheme the format or the model's dims cannot take is a note."""
    from quantfw.config.compose import available

    rows, notes = [], []
    for name in available("scheme", journey.dirs):
        folder = journey.root / name
        overrides = [f"scheme={name}", f"input={float_dir}", f"output={folder}", f"seed={seed}"]
        try:
            cfg = journey.compose(overrides)
        except ConfigError as e:
            notes.append(f"skipped scheme {name}: {e}")
            continue
        rows.append((Row(name, cfg.format.name, folder), overrides, cfg))
    return rows, notes


def _check(journey: Journey, row: Row) -> str:
    try:
        journey.step("check", f"{row.scheme} layout", row.folder, [f"checkpoint={row.folder}"])
    except CheckpointError as e:
        return f"FAIL ({str(e).rsplit(': ', 1)[-1].removesuffix(' (listed above)')})"
    return "OK"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _delta(ppl: dict | None) -> str:
    if not ppl:
        return "-"
    ci = ppl.get("delta_ci95")
    text = f"{100 * ppl['delta']:+.2f}%"
    return f"{text} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else text


def table(float_row: Row, rows: Sequence[Row]) -> str:
    """One line per scheme: bytes on disk, layer error vs float, perplexity delta, check result."""
    from quantfw.eval.report import summary_row

    head = (
        "scheme",
        "format",
        "on disk",
        "vs float",
        "rel_l2 mean",
        "cosine min",
        "ppl",
        "ppl delta [95%]",
        "check",
    )
    lines = [head]
    ppl_float = None
    for r in rows:
        s = summary_row(r.eval) if r.eval else {}
        ppl_float = s.get("ppl_float", ppl_float)
        lines.append(
            (
                r.scheme,
                r.format,
                _mb(r.bytes),
                f"{r.bytes / float_row.bytes:.2f}x",
                _num(s.get("rel_l2_mean"), ".4f"),
                _num(s.get("cosine_min"), ".5f"),
                _num(s.get("ppl_quantized"), ".3f"),
                _delta((r.eval or {}).get("perplexity")),
                r.check,
            )
        )
    lines.insert(
        1,
        (
            float_row.scheme,
            float_row.format,
            _mb(float_row.bytes),
            "1.00x",
            "-",
            "-",
            _num(ppl_float, ".3f"),
            "-",
            "-",
        ),
    )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _eval_overrides(cfg: DictConfig, base: Sequence[str], row: Row, float_dir: Path, root: Path) -> list[str]:
    keys = {o.split("=", 1)[0].lstrip("+~") for o in base}
    ppl = [] if "eval.perplexity" in keys else ["eval.perplexity=true"]  # the tour's default: on
    return [
        f"checkpoint={row.folder}",
        f"reference={float_dir}",
        f"tokens={cfg.tokens}",
        f"seed={cfg.seed}",
        f"out={root / 'eval.json'}",
        *ppl,
    ]


def run(cfg: DictConfig) -> list[dict]:
    recipe, base = recipe_and_overrides()
    if any(o.split("=", 1)[0].lstrip("+~") == "scheme" for o in base):
        raise ConfigError(
            "tour quantizes with every declared scheme: drop scheme=NAME (scheme.KEY=VALUE applies to each)"
        )
    dirs = running_config_dirs()
    with _root(cfg.out) as root:
        float_dir = root / "float"
        journey = Journey(recipe, base, dirs, root, total=1)
        planned, notes = _schemes(journey, float_dir, cfg.seed)
        if not planned:
            raise ConfigError(
                f"format={cfg.format.name}: holds none of the declared schemes ({'; '.join(notes)})"
            )
        journey.total = 1 + 3 * len(planned)
        for note in notes:
            print(f"quantfw tour: {note}", file=sys.stderr)
        journey.step(
            "example",
            f"float {cfg.model.name} {cfg.dtype}",
            float_dir,
            [f"out={float_dir}", f"seed={cfg.seed}"],
        )
        float_row = Row(f"float ({cfg.dtype})", "hf", float_dir, folder_bytes(float_dir))
        rows = []
        for row, overrides, qcfg in planned:
            journey.step("quantize", f"{row.scheme} [{row.format}]", row.folder, overrides, cfg=qcfg)
            row.bytes = folder_bytes(row.folder)
            rows.append(row)
        for row in rows:
            row.check = _check(journey, row)
        for row in rows:
            row.eval = journey.step(
                "eval",
                f"{row.scheme} vs float",
                root / "eval.json",
                _eval_overrides(cfg, base, row, float_dir, root),
            )
        print(table(float_row, rows))
        where = (
            f"kept in {root} (each step's own output: tour.log)"
            if cfg.out
            else "removed (out=DIR keeps them)"
        )
        print(f"quantfw tour: files {where}", file=sys.stderr)
        failed = [r.scheme for r in rows if r.check != "OK"]
        if failed:
            raise CheckpointError(f"{root}: check found problems in {', '.join(failed)} (listed above)")
    return [_row_dict(r) for r in [float_row, *rows]]


def _row_dict(r: Row) -> dict:
    from quantfw.eval.report import summary_row

    return {
        "scheme": r.scheme,
        "format": r.format,
        "folder": str(r.folder),
        "bytes": r.bytes,
        "check": r.check,
        **({"eval": summary_row(r.eval), "perplexity": r.eval.get("perplexity")} if r.eval else {}),
    }
