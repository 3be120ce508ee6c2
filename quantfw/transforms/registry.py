"""Named post-load transforms and the shape-checked pipeline that runs them.

Every op has a shape rule computed from DECLARED shapes and the layout's dims, never from the
tensor it happens to receive. The pipeline checks each input against the declared state before
a step and each output after it, so a step that reads the wrong axis (the upstream W4A8
transpose-order bug) fails with the step and param named instead of reshaping garbage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quantfw.errors import ConfigError, LayoutError
from quantfw.layout import branches
from quantfw.layout.spec import ROLES, parse_dtype
from quantfw.registry import Registry

Decl = tuple[tuple[int, ...], torch.dtype]  # declared (shape, dtype)


@dataclass(frozen=True)
class TransformOp:
    name: str
    run: Callable[..., torch.Tensor]  # (inputs, args, env) -> tensor
    rule: Callable[..., Decl]  # (declared inputs, args, env) -> declared output
    many_inputs: bool  # False: applied to each listed param; True: all params feed one call
    args: frozenset[str]
    doc: str
    consumes: bool = True  # False: the inputs stay in the state next to the output


TRANSFORMS: Registry[TransformOp] = Registry("transform")  # plugins: entry-point group quantfw.transforms
STEP_KEYS = {"op", "params", "roles", "out", "when"}
# Keys of the other step vocabulary, refused with the word to use instead.
REFUSED_KEYS = {
    "args": "transform steps name their tensors under 'params' and op arguments as keys (dims: [1, 2])"
}


def register(
    name: str,
    *,
    rule,
    many_inputs: bool = False,
    args: Sequence[str] = (),
    doc: str = "",
    consumes: bool = True,
):
    """Register a transform under a name recipes can use; names are unique.

    consumes=False keeps the inputs (a step that reads several params to derive one)."""

    def deco(fn):
        TRANSFORMS.add(
            name,
            TransformOp(
                name, fn, rule, many_inputs, frozenset(args), doc or (fn.__doc__ or "").strip(), consumes
            ),
        )
        return fn

    return deco


def available() -> dict[str, TransformOp]:
    return dict(TRANSFORMS.items())


def _fmt(decl: Decl) -> str:
    return f"{list(decl[0])} {str(decl[1]).removeprefix('torch.')}"


@dataclass(frozen=True)
class Step:
    op: TransformOp
    params: tuple[str, ...]
    roles: tuple[str, ...]
    out: str | None
    when: Any
    args: Mapping[str, Any]
    label: str  # "format 'msmodelslim' load step 3 (fuse_scales_fp16)" for messages
    guards: tuple[branches.Guard, ...] = ()  # the if/choose branches the step sits in

    def applies(self, env: Mapping[str, Any]) -> bool:
        return branches.holds(self.guards, self.when, env, self.label)


def parse_steps(raw: Sequence[Mapping[str, Any]], where: str) -> list[Step]:
    steps = []
    for item, guards, label in branches.flatten(raw, where):
        if not isinstance(item, Mapping) or "op" not in item:
            raise ConfigError(f"{label}: expected a mapping with 'op', found {item!r}")
        name = item["op"]
        op = TRANSFORMS.get(name, label)
        label = f"{label} ({name})"
        refused = [k for k in REFUSED_KEYS if k in item and k not in op.args]
        if refused:
            raise ConfigError(f"{label}: key '{refused[0]}' is not used here: {REFUSED_KEYS[refused[0]]}")
        unknown = set(item) - STEP_KEYS - op.args
        if unknown:
            raise ConfigError(
                f"{label}: unknown key(s) {sorted(unknown)} (allowed: {sorted(STEP_KEYS | op.args)})"
            )
        params = item.get("params", [])
        params = [params] if isinstance(params, str) else list(params)
        if not params:
            raise ConfigError(f"{label}: 'params' is empty")
        roles = tuple(item.get("roles", ROLES))
        if not set(roles) <= set(ROLES):
            raise ConfigError(f"{label}.roles: {list(roles)} (allowed: {list(ROLES)})")
        args = {k: item[k] for k in op.args if k in item}
        steps.append(Step(op, tuple(params), roles, item.get("out"), item.get("when"), args, label, guards))
    return steps


class Pipeline:
    """An ordered list of steps over the `{role}_{param}` tensors of one layer."""

    def __init__(self, steps: Sequence[Step]):
        self.steps = list(steps)

    def __add__(self, other: Pipeline) -> Pipeline:
        return Pipeline(self.steps + other.steps)

    def _calls(self, step: Step, names: Mapping[str, Any], env_of: Callable[[str], Mapping[str, Any]]):
        """(role, input names, output name, env) of each call a step makes on the current state."""
        for role in step.roles:
            env = env_of(role)
            if not step.applies(env):
                continue
            inputs = [f"{role}_{p}" for p in step.params]
            present = [n in names for n in inputs]
            if not any(present):
                continue  # the param is not declared for this role (e.g. w2-only alpha)
            if step.op.many_inputs:
                if not all(present):
                    missing = [n for n, ok in zip(inputs, present) if not ok]
                    raise LayoutError(f"{step.label}: needs {missing}, which the layout does not have here")
                yield role, inputs, f"{role}_{step.out}" if step.out else inputs[0], env
            else:
                for name, ok in zip(inputs, present):
                    if ok:
                        yield role, [name], f"{role}_{step.out}" if step.out else name, env

    def declare(
        self, state: Mapping[str, Decl], env_of: Callable[[str], Mapping[str, Any]]
    ) -> dict[str, Decl]:
        """Run the shape rules alone: the layout after the pipeline, with no tensor touched."""
        state = dict(state)
        for step in self.steps:
            self._check_step_has_inputs(step, state, env_of)
            for _, inputs, out, env in list(self._calls(step, state, env_of)):
                decl = step.op.rule([state[n] for n in inputs], step.args, env)
                for n in inputs if step.op.consumes else ():
                    state.pop(n)
                if decl is not None:
                    state[out] = decl
        return state

    def _check_step_has_inputs(self, step, state, env_of):
        active = [r for r in step.roles if step.applies(env_of(r))]
        if active and not any(f"{r}_{p}" in state for r in active for p in step.params):
            raise LayoutError(
                f"{step.label}: no param {list(step.params)} exists at this point of the pipeline"
            )

    def run(
        self,
        tensors: Mapping[str, torch.Tensor],
        state: Mapping[str, Decl],
        env_of: Callable[[str], Mapping[str, Any]],
    ) -> dict[str, torch.Tensor]:
        """Apply every step, checking each input and output against the declared state."""
        tensors, state = dict(tensors), dict(state)
        for step in self.steps:
            self._check_step_has_inputs(step, state, env_of)
            for _, inputs, out, env in list(self._calls(step, state, env_of)):
                for n in inputs:
                    t = tensors[n]
                    if (tuple(t.shape), t.dtype) != state[n]:
                        raise LayoutError(
                            f"{step.label}: input {n} is {_fmt((tuple(t.shape), t.dtype))}, "
                            f"declared {_fmt(state[n])}"
                        )
                decl = step.op.rule([state[n] for n in inputs], step.args, env)
                result = step.op.run([tensors[n] for n in inputs], step.args, env)
                for n in inputs if step.op.consumes else ():
                    tensors.pop(n)
                    state.pop(n)
                if decl is None:
                    continue
                if (tuple(result.shape), result.dtype) != decl:
                    raise LayoutError(
                        f"{step.label}: output {out} is {_fmt((tuple(result.shape), result.dtype))}, "
                        f"declared {_fmt(decl)}"
                    )
                tensors[out], state[out] = result, decl
        return tensors


def role_dtype(value: Any, env: Mapping[str, Any], label: str) -> torch.dtype:
    if isinstance(value, Mapping):
        value = value.get("w13" if env.get("role_is_w13") else "w2", None)
    return parse_dtype(value, label)
