#!/usr/bin/env python3
"""Trains a small, real probe pack for SmolLM2-135M-Instruct from the WordNet noun hierarchy.

    .venv/bin/python examples/train_pack.py --out smollm2-pack        # ~340 concepts, minutes
    .venv/bin/python examples/train_pack.py --out tiny --tiny         # ~30 concepts, seconds

Concepts: a few WordNet roots (animal, plant, food, person, vehicle, ...) as layer 0, their
hyponyms with the largest subtrees as layer 1, and theirs as layer 2 (WordNet 3.0 from
Debian's `wordnet-base`, read directly from its database files).

Data: for each concept, prompts made from the lemmas of the synset and of its hyponyms (all of
WordNet's subtree below it), each ending on the lemma: "This is a golden retriever". The
sample is the model's final-norm hidden state at the last position, which is what
`probe_cascade.hf.monitor(..., layer="last")` reads during generation. A sample is positive
for every concept whose WordNet subtree holds its synset, negative for the others.

Probes: HatCat's MLP (D→128→ReLU→Dropout→64→ReLU→Dropout→1) and BCE loss, all concepts
trained at once as batched matrices, on balanced batches (half positives). 20% of the samples
are held out; the script prints the probes' balanced accuracy on them. Output: a
probe-cascade pack (probe_cascade.pack.write).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402

import probe_cascade  # noqa: E402

WORDNET = Path(os.environ.get("WORDNET_DIR", "/usr/share/wordnet"))
# (lemma, WordNet sense number): recognizable roots for layer 0.
ROOTS = [
    ("animal", 1), ("plant", 2), ("food", 2), ("person", 1), ("vehicle", 1), ("building", 1),
    ("body_part", 1), ("feeling", 1), ("weapon", 1), ("tool", 1), ("clothing", 1), ("furniture", 1),
    ("musical_instrument", 1), ("disease", 1), ("container", 1), ("geological_formation", 1),
]
TEMPLATES = ["This is a {}", "I saw the {}", "We talked about the {}", "She pointed at a {}"]


class WordNet:
    """The noun database: synsets by offset, their lemmas, hypernyms and hyponyms."""

    def __init__(self, root: Path) -> None:
        data, index = root / "data.noun", root / "index.noun"
        for f in (data, index):
            if not f.exists():
                sys.exit(f"error: {f} not found: install Debian's wordnet-base (apt-get install wordnet-base)")
        self.lemmas: dict[int, list[str]] = {}
        self.hyponyms: dict[int, list[int]] = defaultdict(list)
        with open(data, encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue  # the licence header
                fields = line.split(" | ")[0].split()
                offset, count = int(fields[0]), int(fields[3], 16)
                words = [fields[4 + 2 * i] for i in range(count)]
                self.lemmas[offset] = [w.split("(")[0].replace("_", " ") for w in words]
                at = 4 + 2 * count
                pointers = int(fields[at])
                for p in range(pointers):
                    sym, target, pos = fields[at + 1 + 4 * p : at + 4 + 4 * p]
                    if sym in ("~", "~i") and pos == "n":
                        self.hyponyms[offset].append(int(target))
        self.senses: dict[str, list[int]] = {}
        with open(index, encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue
                f = line.split()
                synsets = int(f[2])
                self.senses[f[0]] = [int(x) for x in f[-synsets:]]
        self._subtree: dict[int, frozenset] = {}

    def synset(self, lemma: str, sense: int) -> int:
        return self.senses[lemma][sense - 1]

    def name(self, offset: int) -> str:
        """WordNet's own key, `dog.n.01`: unique, and readable."""
        lemma = self.lemmas[offset][0].replace(" ", "_").lower()
        senses = self.senses.get(lemma, [])
        sense = senses.index(offset) + 1 if offset in senses else 1
        return f"{lemma}.n.{sense:02d}"

    def subtree(self, offset: int) -> frozenset:
        """The synset and everything below it."""
        if offset not in self._subtree:
            seen, stack = {offset}, [offset]
            while stack:
                for h in self.hyponyms.get(stack.pop(), []):
                    if h not in seen:
                        seen.add(h)
                        stack.append(h)
            self._subtree[offset] = frozenset(seen)
        return self._subtree[offset]


def choose_concepts(wn: WordNet, roots: int, per_root: int, per_child: int):
    """[(offset, layer, parent indices)]: roots, then their largest hyponyms, twice."""
    concepts: list[tuple[int, int, list[int]]] = []
    index: dict[int, int] = {}

    def add(offset: int, layer: int, parent: int | None) -> bool:
        if offset in index:  # a DAG: a second parent
            if parent is not None and parent not in concepts[index[offset]][2]:
                concepts[index[offset]][2].append(parent)
            return False
        index[offset] = len(concepts)
        concepts.append((offset, layer, [] if parent is None else [parent]))
        return True

    layer0 = [wn.synset(l, s) for l, s in ROOTS[:roots]]
    for o in layer0:
        add(o, 0, None)
    frontier = layer0
    for layer, keep in ((1, per_root), (2, per_child)):
        nxt = []
        for o in frontier:
            kids = sorted(wn.hyponyms.get(o, []), key=lambda h: -len(wn.subtree(h)))
            kids = [k for k in kids if len(wn.subtree(k)) >= 2][:keep]
            for k in kids:
                if add(k, layer, index[o]):
                    nxt.append(k)
        frontier = nxt
    return concepts


def build_samples(wn: WordNet, concepts, lemmas_per_concept: int, rng: random.Random):
    """(text, source synset) pairs: each concept's own and its subtree's lemmas in templates."""
    seen, samples = set(), []
    for offset, _, _ in concepts:
        pool = sorted({(s, l) for s in wn.subtree(offset) for l in wn.lemmas[s][:2]})
        own = [(offset, l) for l in wn.lemmas[offset]]
        pick = own + rng.sample(pool, min(len(pool), lemmas_per_concept))
        for s, lemma in pick:
            if (s, lemma) in seen:
                continue
            seen.add((s, lemma))
            for t in rng.sample(TEMPLATES, 2):
                samples.append((t.format(lemma), s))
    return samples


@torch.no_grad()
def hidden_states(model, tok, texts, batch: int = 64) -> torch.Tensor:
    """The final norm's output at each text's last position, [N, D]. Runs the decoder only
    (no LM head over the 49k vocabulary), on batches of similar length (little padding)."""
    decoder = model.get_decoder()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True)  # left padding
        h = decoder(**enc, use_cache=False).last_hidden_state  # after the final norm
        out[idx] = h[:, -1, :].float()
    return out


class BatchedMLP(torch.nn.Module):
    """C copies of HatCat's probe MLP, evaluated together: x [C, M, D] -> logits [C, M]."""

    def __init__(self, c: int, d: int, dropout: float = 0.1) -> None:
        super().__init__()

        def layer(n_in, n_out):
            w = torch.empty(c, n_in, n_out)
            for i in range(c):
                torch.nn.init.kaiming_uniform_(w[i].T, a=5**0.5)  # nn.Linear's default
            bound = 1 / n_in**0.5
            return torch.nn.Parameter(w), torch.nn.Parameter(torch.empty(c, 1, n_out).uniform_(-bound, bound))

        self.w1, self.b1 = layer(d, 128)
        self.w2, self.b2 = layer(128, 64)
        self.w3, self.b3 = layer(64, 1)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(torch.baddbmm(self.b1, x, self.w1)))
        h = self.drop(torch.relu(torch.baddbmm(self.b2, h, self.w2)))
        return torch.baddbmm(self.b3, h, self.w3).squeeze(-1)


def train(model, tok, out, *, roots=len(ROOTS), per_root=5, per_child=3, lemmas=16, steps=250, batch=64,
          seed=0, dtype="f32", log=print) -> dict:
    """Trains a pack for `model` into `out`; returns what it did (counts, held-out rates)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    t0 = time.time()
    wn = WordNet(WORDNET)
    concepts = choose_concepts(wn, roots, per_root, per_child)
    samples = build_samples(wn, concepts, lemmas, rng)
    layers = defaultdict(int)
    for _, layer, _ in concepts:
        layers[layer] += 1
    log(f"wordnet: {len(concepts)} concepts (per layer {dict(layers)}), {len(samples)} prompts")

    x = hidden_states(model, tok, [t for t, _ in samples])
    n, d = x.shape
    log(f"model: {n} hidden states of D={d} in {time.time() - t0:.0f} s")

    # labels[c, s]: is sample s's synset in concept c's subtree?
    src = [s for _, s in samples]
    labels = torch.zeros(len(concepts), n)
    for c, (offset, _, _) in enumerate(concepts):
        sub = wn.subtree(offset)
        labels[c] = torch.tensor([1.0 if s in sub else 0.0 for s in src])
    held = torch.rand(n) < 0.2
    pos_idx = [torch.nonzero((labels[c] > 0) & ~held).flatten() for c in range(len(concepts))]
    neg_idx = [torch.nonzero((labels[c] == 0) & ~held).flatten() for c in range(len(concepts))]

    mlp = BatchedMLP(len(concepts), d)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    m = batch
    y = torch.cat([torch.ones(len(concepts), m), torch.zeros(len(concepts), m)], dim=1)
    for step in range(steps):
        idx = torch.stack(
            [
                torch.cat(
                    [
                        p[torch.randint(len(p), (m,))] if len(p) else torch.randint(n, (m,)),
                        q[torch.randint(len(q), (m,))],
                    ]
                )
                for p, q in zip(pos_idx, neg_idx)
            ]
        )
        loss = loss_fn(mlp(x[idx]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"train: step {step:4d}  loss {loss.item():.4f}")

    mlp.eval()
    with torch.no_grad():
        logits = mlp(x[held].unsqueeze(0).expand(len(concepts), -1, -1))
        pred, truth = logits > 0, labels[:, held] > 0
        tpr = ((pred & truth).sum(1) / truth.sum(1).clamp(min=1)).mean().item()
        tnr = ((~pred & ~truth).sum(1) / (~truth).sum(1).clamp(min=1)).mean().item()
    log(f"held out ({int(held.sum())} prompts): true-positive rate {tpr:.3f}, true-negative rate {tnr:.3f}")

    weights = {
        "w1": mlp.w1.detach().transpose(1, 2),  # [C, 128, D], nn.Linear's layout
        "b1": mlp.b1.detach().squeeze(1),
        "w2": mlp.w2.detach().transpose(1, 2),
        "b2": mlp.b2.detach().squeeze(1),
        "w3": mlp.w3.detach().transpose(1, 2),
        "b3": mlp.b3.detach().squeeze(1),
    }
    defs = [(wn.name(o), layer, parents) for o, layer, parents in concepts]
    probe_cascade.pack.write(out, defs, weights, dtype=dtype)
    log(f"wrote {out}: {len(defs)} concepts, D={d}, {dtype}, in {time.time() - t0:.0f} s")
    return {"concepts": len(defs), "prompts": n, "tpr": tpr, "tnr": tnr, "seconds": time.time() - t0}


TINY = dict(roots=3, per_root=3, per_child=2, lemmas=8, steps=80)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the new pack")
    ap.add_argument("--tiny", action="store_true", help="~30 concepts and a short run (for tests)")
    ap.add_argument("--roots", type=int, default=len(ROOTS))
    ap.add_argument("--per-root", type=int, default=5, help="layer-1 children kept per root")
    ap.add_argument("--per-child", type=int, default=3, help="layer-2 children kept per layer-1 concept")
    ap.add_argument("--lemmas", type=int, default=16, help="subtree lemmas sampled per concept")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=64, help="positives (and as many negatives) per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    args = ap.parse_args()
    sizes = dict(roots=args.roots, per_root=args.per_root, per_child=args.per_child, lemmas=args.lemmas,
                 steps=args.steps)
    if args.tiny:
        sizes = TINY
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, tok = smollm2.load()
    train(model, tok, args.out, batch=args.batch, seed=args.seed, dtype=args.dtype,
          log=lambda m: print(m, flush=True), **sizes)


if __name__ == "__main__":
    main()
