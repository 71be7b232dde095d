"""`erasekit demo` and `erasekit eval`: erase shapes-world concepts with every method and measure what the model
still draws, as the papers measure Stable Diffusion (efficacy, generality, specificity, implicit-concept rate).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..erasers import attack
from ..erasers.attack import soft_prompt
from ..erasers.files import write_atomic, write_stream
from . import data, methods, metrics
from .judge import Judge
from .model import ShapesPipeline

GRID_SEEDS = (0, 1, 2, 3)
CELL_SCALE = 2


class OutputDirError(OSError):
    pass


def writable_dir(out: Path) -> Path:
    """Create `out` (and parents) and prove it takes files, before minutes of sampling."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".erasekit-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"cannot write to output folder {out}: {err.strerror or err}; "
                             "pass --out with a folder you can write to") from None
    return out


def demo_prompts(concept: metrics.Concept) -> list[tuple[str, str]]:
    """(row label, prompt): the erased concept, a synonym of it, and unrelated prompts of other shapes."""
    sets = metrics.probe_sets(concept, n=1)
    rows = [("erased", sets["efficacy"][0].prompt)]
    if sets["generality"] is not None:
        rows.append(("synonym", sets["generality"][0].prompt))
    seen = {sets["efficacy"][0].shape, sets["efficacy"][0].color, sets["efficacy"][0].pattern}
    for probe in sets["specificity"]:
        if len(rows) < 4 and not {probe.shape, probe.color} & seen:
            rows.append(("other", probe.prompt))
            seen |= {probe.shape, probe.color, probe.pattern}
    return rows


def _tile(images: np.ndarray) -> np.ndarray:
    """2×2 tile of four images, each scaled up by CELL_SCALE."""
    big = images.repeat(CELL_SCALE, 1).repeat(CELL_SCALE, 2)
    top, bottom = np.concatenate(big[:2], 1), np.concatenate(big[2:4], 1)
    return np.concatenate([top, bottom], 0)


def write_grid(path: Path, rows: list[tuple[str, str]], columns: list[str], cells: dict) -> None:
    from PIL import Image, ImageDraw

    cell = data.SIZE * CELL_SCALE * 2
    label_w, head_h, pad = 190, 18, 4
    grid = Image.new("RGB", (label_w + len(columns) * (cell + pad), head_h + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((label_w + j * (cell + pad) + 4, 3), name, fill="black")
    for i, (label, prompt) in enumerate(rows):
        y = head_h + i * (cell + pad)
        draw.text((4, y + 4), label, fill="black")
        draw.text((4, y + 20), prompt[:30], fill="black")
        if len(prompt) > 30:
            draw.text((4, y + 34), prompt[30:60], fill="black")
        for j, name in enumerate(columns):
            grid.paste(Image.fromarray(_tile(cells[name][i])), (label_w + j * (cell + pad), y))
    write_stream(path, lambda out: grid.save(out, format="PNG"))


# --- attack success rate (UnlearnDiffAtk, erasers/attack/unlearn_diff.py) ---------------------------------------

PROTOCOLS = ("quick", "official")


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown attack protocol {protocol!r}: one of {', '.join(PROTOCOLS)}")


def attack_targets(pipe: ShapesPipeline, concept: metrics.Concept | str, n: int,
                   seed: int = 0) -> tuple[list[metrics.Probe], np.ndarray] | None:
    """The efficacy cell's probes and the images the model draws for them now: call it before erasing, so they are
    the original model's images of the concept (the attack's targets). None for the stamp: no prompt names it."""
    concept = metrics.parse_concept(concept) if isinstance(concept, str) else concept
    if concept.kind == "stamp":
        return None
    probes = metrics.probe_sets(concept, n, seed)["efficacy"]
    return probes, methods.generator(pipe)([p.prompt for p in probes], [p.seed for p in probes])


def _shows(judge: Judge, concept: metrics.Concept, images: np.ndarray) -> np.ndarray:
    return getattr(judge(images), concept.kind) == metrics.VALUES[concept.kind].index(concept.name)


def measure_asr(pipe: ShapesPipeline, judge: Judge, concept: metrics.Concept | str,
                targets: tuple[list[metrics.Probe], np.ndarray] | None, steps: int = attack.STEPS, seed: int = 0,
                pre_images: np.ndarray | None = None, protocol: str = "quick", **options) -> dict:
    """UnlearnDiffAtk against the pipeline as it is now (erasure on), on the efficacy prompts of `targets`.

    As in UnlearnDiffAtk, a prompt whose image already shows the concept is a success without an attack; every
    other prompt is attacked (its image as the target) and its attacked prompt drawn with the same seed and judged:
    once (protocol "quick": attack.unlearn_diff_attack, `steps` steps), or after each of the official protocol's
    blocks of `steps` steps until the first success ("official": attack.unlearn_diff_search). `asr` is the fraction
    of successes (lower is better), `asr_pre` the same prompts' fraction before the attack, i.e. the efficacy cell.
    `pre_images`: the erased model's images of those probes, if already drawn. `options` go to the attack function
    (k, lr, discrete, timesteps, ...). For the stamp (targets None) every value is None."""
    check_protocol(protocol)
    concept = metrics.parse_concept(concept) if isinstance(concept, str) else concept
    empty = {"asr": None, "asr_pre": None, "asr_n": 0, "asr_attacked": 0, "asr_targets_show": None,
             "asr_protocol": protocol, "asr_steps": steps, "asr_images": 0, "asr_seconds": 0.0, "asr_prompts": []}
    if targets is None:
        return empty
    start = time.time()
    probes, target_images = targets
    prompts, seeds = [p.prompt for p in probes], [p.seed for p in probes]
    if pre_images is None:
        pre_images = methods.generator(pipe)(prompts, seeds)
    pre = _shows(judge, concept, pre_images)
    success = pre.copy()
    rest = np.flatnonzero(~pre)
    chosen, chosen_seeds = [prompts[i] for i in rest], [seeds[i] for i in rest]
    attacked, checks = [], np.zeros(len(rest), int)
    if len(rest):
        x0 = torch.from_numpy(target_images[rest]).permute(0, 3, 1, 2).float() / 127.5 - 1
        if protocol == "quick":
            result = attack.unlearn_diff_attack(pipe, chosen, x0, seeds=chosen_seeds, steps=steps, seed=seed,
                                                **options)
            post = _shows(judge, concept, pipe(chosen, chosen_seeds, context=result.contexts))
            checks[:] = 1
        else:
            def succeeded(rows: list[int], ids: torch.Tensor) -> np.ndarray:
                with torch.no_grad():  # through the text encoder: SPM's gates record the attacked prompt's tokens
                    contexts = soft_prompt.encode(pipe.text_encoder, ids, None)
                images = pipe([chosen[r] for r in rows], [chosen_seeds[r] for r in rows], context=contexts)
                return _shows(judge, concept, images)

            result = attack.unlearn_diff_search(pipe, chosen, x0, succeeded, seeds=chosen_seeds, iterations=steps,
                                                seed=seed, **options)
            post, checks = result.success, result.checks
        success[rest] = post
        attacked = [{"prompt": prompts[i], "seed": seeds[i], "attacked": hard, "shows": bool(hit),
                     "images": int(drawn)}
                    for i, hard, hit, drawn in zip(rest, result.hard_prompts, post, checks)]
    # How many targets the original model drew showing the concept: a target without it cannot guide the attack.
    targets_show = float(_shows(judge, concept, target_images).mean())
    return {"asr": float(success.mean()), "asr_pre": float(pre.mean()), "asr_n": len(probes),
            "asr_attacked": len(rest), "asr_targets_show": targets_show, "asr_protocol": protocol,
            "asr_steps": steps, "asr_images": int(checks.sum()), "asr_seconds": round(time.time() - start, 1),
            "asr_prompts": attacked}


def attack_success_rate(pipe: ShapesPipeline, judge: Judge, method: str, concept: str, n: int = 18, seed: int = 0,
                        steps: int = attack.STEPS, **options) -> dict:
    """`method` erasing `concept`, attacked on the efficacy cell's prompts (n at least; targets drawn by the model
    as it is before erasing); see measure_asr."""
    targets = attack_targets(pipe, concept, n, seed)
    with methods.erased(pipe, method, concept):
        return measure_asr(pipe, judge, concept, targets, steps, seed, **options)


class _Remembering:
    """A generator that keeps what it drew, so the attack reuses the efficacy cell's own images as its baseline."""

    def __init__(self, generate: metrics.Generate):
        self.generate, self.images = generate, {}

    def __call__(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        images = self.generate(prompts, seeds)
        self.images.update(zip(zip(prompts, seeds), images))
        return images

    def of(self, probes: list[metrics.Probe]) -> np.ndarray | None:
        keys = [(p.prompt, p.seed) for p in probes]
        return np.stack([self.images[k] for k in keys]) if all(k in self.images for k in keys) else None


def evaluate(pipe: ShapesPipeline, judge: Judge, method_names: list[str], concept_names: list[str], n: int,
             seed: int = 0, grid_rows: list[tuple[str, str]] | None = None, log=print,
             attack_steps: int | None = None, attack_protocol: str = "quick") -> tuple[list[dict], dict]:
    """One row per (concept, method): metrics of the model with that erasure; and the grid cells if asked. With
    `attack_steps`, each row also gets the UnlearnDiffAtk attack success rate on its efficacy prompts (measure_asr,
    with `attack_protocol`)."""
    methods.check_methods(method_names)
    concepts = [metrics.parse_concept(c) for c in concept_names]
    rows, cells = [], {}
    prior = None
    for concept in concepts:
        targets = attack_targets(pipe, concept, n, seed) if attack_steps is not None else None
        for method in method_names:
            generate = _Remembering(methods.generator(pipe))
            reason = methods.unavailable(method, concept.name)
            if reason:
                log(f"{concept.name:10s} {method:10s} skipped: {reason}")
                continue
            start = time.time()
            if method == "trce" and prior is None:
                from ..erasers.closed_form.recipes import caption_prior
                prior = caption_prior(pipe.encoder(), methods.world_captions())
            with methods.erased(pipe, method, concept.name, prior) as erasure:
                erase_s = time.time() - start
                result = metrics.measure(generate, judge, concept, n=n, seed=seed)
                if attack_steps is not None:
                    pre = generate.of(targets[0]) if targets is not None else None
                    result.update(measure_asr(pipe, judge, concept, targets, attack_steps, seed, pre_images=pre,
                                              protocol=attack_protocol))
                if grid_rows is not None:
                    prompts = [p for _, p in grid_rows for _ in GRID_SEEDS]
                    images = generate(prompts, list(GRID_SEEDS) * len(grid_rows))
                    cells[method] = images.reshape(len(grid_rows), len(GRID_SEEDS), *images.shape[1:])
            row = {"concept": concept.name, "kind": concept.kind, "method": method, **result,
                   "erase_seconds": round(erase_s, 3), "seconds": round(time.time() - start, 1),
                   "erasure_rank": max((d.rank for d in erasure.layers.values()), default=0) if erasure else 0}
            rows.append(row)
            log(format_row(row))
    return rows, cells


HEADER = (f"{'concept':10s} {'method':10s} {'efficacy↓':>9s} {'generality↓':>11s} {'specificity↑':>12s} "
          f"{'shape':>6s} {'colour':>6s} {'pattern':>7s} {'stamp':>6s} {'imgs':>4s}")
ATTACK_HEADER = HEADER.replace(f"{'efficacy↓':>9s} ", f"{'efficacy↓':>9s} {'ASR↓':>6s} ")


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _images(row: dict) -> int:
    return sum(row["n"].values())


def format_row(row: dict) -> str:
    asr = f" {_pct(row['asr']):>6s}" if "asr" in row else ""
    return (f"{row['concept']:10s} {row['method']:10s} {_pct(row['efficacy']):>9s}{asr} {_pct(row['generality']):>11s} "
            f"{_pct(row['specificity']):>12s} {_pct(row['shape_acc']):>6s} {_pct(row['color_acc']):>6s} "
            f"{_pct(row['pattern_acc']):>7s} {_pct(row['stamp_rate']):>6s} {_images(row):>4d}")


def format_quality(q: dict) -> str:
    return (f"base quality (n={q['n']}): requested shape {_pct(q['shape_acc'])}%, colour {_pct(q['color_acc'])}%, "
            f"pattern {_pct(q['pattern_acc'])}%, stamp rate {_pct(q['stamp_rate'])}% "
            f"(training {100 * data.STAMP_RATE:.0f}%)")


def markdown_table(rows: list[dict]) -> str:
    """With an `asr` column (UnlearnDiffAtk attack success rate) when the rows were measured with the attack."""
    attacked = any("asr" in r for r in rows)
    lines = ["| concept | method | efficacy ↓ | " + ("ASR ↓ | " if attacked else "") +
             "generality ↓ | specificity ↑ | shape | colour | pattern | stamp rate | images |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if attacked else "")]
    for r in rows:
        asr = f"{_pct(r.get('asr'))} | " if attacked else ""
        lines.append(f"| {r['concept']} | {r['method']} | {_pct(r['efficacy'])} | {asr}{_pct(r['generality'])} | "
                     f"{_pct(r['specificity'])} | {_pct(r['shape_acc'])} | {_pct(r['color_acc'])} | "
                     f"{_pct(r['pattern_acc'])} | {_pct(r['stamp_rate'])} | {_images(r)} |")
    return "\n".join(lines)


def run_demo(out: Path, concept: str = "circle", method_names: list[str] | None = None, n: int = 18) -> dict:
    out = writable_dir(Path(out))
    # The plain-word negative is a baseline, not one of the pack's erasures; eval has it, the demo keeps to 3 minutes.
    method_names = list(method_names or [m for m in methods.METHODS if m != methods.NEGATIVE])
    methods.check_methods(method_names)
    parsed = metrics.parse_concept(concept)
    start = time.time()
    pipe, judge = ShapesPipeline.load(), Judge.load()
    grid_rows = demo_prompts(parsed)
    erasing = [m for m in method_names if m != methods.ORIGINAL and not methods.unavailable(m, concept)]
    print(f"shapes world: erasing {concept!r} with {', '.join(erasing)}; "
          f"{n} images per cell (erasekit eval runs 50)\n{HEADER}", flush=True)
    rows, cells = evaluate(pipe, judge, method_names, [concept], n, grid_rows=grid_rows,
                           log=lambda line: print(line, flush=True))
    write_grid(out / "grid.png", grid_rows, [m for m in method_names if m in cells], cells)
    result = {"concept": concept, "rows": rows, "grid_prompts": [p for _, p in grid_rows],
              "seconds": round(time.time() - start, 1)}
    write_atomic(out / "metrics.json", json.dumps(result, indent=1))
    print(f"wrote {out / 'grid.png'} and {out / 'metrics.json'} in {result['seconds']} s")
    return result


DEFAULT_EVAL_CONCEPTS = ("circle", "red", "striped", "stamp")


def run_eval(out: Path, method_names: list[str] | None = None, concept_names: list[str] | None = None,
             n: int = 50, attack_steps: int | None = None, attack_protocol: str = "quick") -> list[dict]:
    """The eval table; with `attack_steps`, an ASR column (UnlearnDiffAtk with that many steps, measure_asr; the
    official protocol takes that many at each of its timesteps)."""
    if attack_steps is not None and attack_steps < 0:
        raise ValueError(f"--attack-steps must be >= 0, got {attack_steps}")
    check_protocol(attack_protocol)  # before minutes of loading and sampling
    out = writable_dir(Path(out))
    method_names = list(method_names or methods.METHODS)
    concept_names = list(concept_names or DEFAULT_EVAL_CONCEPTS)
    methods.check_methods(method_names)
    for c in concept_names:
        metrics.parse_concept(c)
    pipe, judge = ShapesPipeline.load(), Judge.load()
    base = None
    if methods.ORIGINAL in method_names:
        from .card import measure_quality

        base = measure_quality(pipe, judge)
        print(format_quality(base), flush=True)
    print(HEADER if attack_steps is None else ATTACK_HEADER, flush=True)
    start = time.time()
    rows, _ = evaluate(pipe, judge, method_names, concept_names, n, log=lambda line: print(line, flush=True),
                       attack_steps=attack_steps, attack_protocol=attack_protocol)
    summary = {"base_quality": base, "rows": rows, "seconds": round(time.time() - start, 1)}
    if attack_steps is not None:
        summary["attack"] = {"name": "UnlearnDiffAtk", "protocol": attack_protocol, "steps": attack_steps,
                             "k": attack.K, "lr": attack.LR, "discrete": True, "seed": 0}
        if attack_protocol == "official":
            summary["attack"].update(timesteps=attack.SEARCH_TIMESTEPS, weight_decay=attack.SEARCH_WEIGHT_DECAY)
    write_atomic(out / "eval.json", json.dumps(summary, indent=1))
    text = markdown_table(rows) + "\n"
    if base is not None:
        text = format_quality(base) + "\n\n" + text
    write_atomic(out / "eval.md", text)
    print(f"wrote {out / 'eval.md'} and {out / 'eval.json'}")
    return rows
