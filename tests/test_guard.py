"""The model-level guard on learned alphas, on a toy LM whose layers' effects are known."""

import torch

from quantfw.calibrate.guard import guard_layers, split_guard_windows, token_nll

V = 16


class ToyLM(torch.nn.Module):
    """Logits favour the true next token (ids step by 7 mod V) by `skill`; each switched-on layer adds its
    own `effect` to that margin (helps if > 0, hurts if < 0), with a little token-dependent noise."""

    def __init__(self, effects):
        super().__init__()
        self.effects, self.on = effects, set()

    def forward(self, input_ids, use_cache=False):
        nxt = (input_ids + 7) % V
        margin = 1.0 + sum(self.effects[layer] for layer in self.on)
        noise = 0.05 * torch.sin(input_ids.float() * 1.7)
        logits = torch.zeros(*input_ids.shape, V)
        logits.scatter_(-1, nxt.unsqueeze(-1), (margin + noise).unsqueeze(-1))
        return type("Out", (), {"logits": logits})()


def switch(model):
    def set_learned(layer, on):
        (model.on.add if on else model.on.discard)(layer)

    return set_learned


def windows(n=4, seq=64):
    return (torch.arange(n * seq) * 7 % V).view(n, seq)


def test_guard_keeps_helping_layers_and_drops_hurting_or_neutral_ones():
    model = ToyLM({0: 0.3, 1: -0.3, 2: 0.0, 3: 0.2})
    kept, report = guard_layers(model, switch(model), [0, 1, 2, 3], windows())
    assert kept == {0, 3} and model.on == {0, 3}  # the model is left as decided
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows[0]["nll_gain"] > 0 > rows[1]["nll_gain"] and rows[2]["nll_gain"] == 0
    assert report["combined"]["nll_gain"] > rows[0]["nll_gain"]
    assert report["tokens"] == 4 * 63 and report["kept_layers"] == [0, 3]
    base = token_nll(ToyLM({}), windows())
    assert abs(report["baseline_nll"] - base.mean().item()) < 1e-6


def test_guard_reverts_everything_when_nothing_helps():
    model = ToyLM({0: -0.1, 1: 0.0})
    kept, report = guard_layers(model, switch(model), [0, 1], windows())
    assert kept == set() and model.on == set() and report["combined"] is None


def test_split_guard_windows_is_disjoint_and_spread():
    w = torch.arange(10 * 4).view(10, 4)
    search, guard = split_guard_windows(w, 3)
    assert search.shape == (7, 4) and guard.shape == (3, 4)
    starts = sorted(guard[:, 0].tolist())
    assert starts[0] > 0 and starts[-1] < 36  # not the first or last window
    assert set(search[:, 0].tolist()).isdisjoint(starts)
    assert split_guard_windows(w, 0)[1].shape[0] == 0
