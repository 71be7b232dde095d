"""``python -m erasekit.cli.fuzz``: the long fuzz run over every file format (testing/fuzz.py), each case in a worker
process so that a crash or a hang in native code is one case's outcome, not the end of the run.

    python -m erasekit.cli.fuzz --per-format 2000 --seed 0 [--format erasure] [--summary fuzz-summary.json]
    python -m erasekit.cli.fuzz --replay 'erasure#123456'      # one case again, in this process, with its traceback

It prints a table of counts by format × outcome, a replay line per failure (the first 40) and the commonest failure
kinds per format, and writes everything (every failure included) as a JSON summary. Exit status 1 if any case
failed. This module also adds the one CLI file format, the batch manifest (``manifest.jsonl``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..erasers.files import write_atomic
from ..erasers.io.prompt_lists import PromptItem
from ..testing.fuzz import OUTCOMES, Case, Format, Fuzzer, Result, cases
from ..testing.fuzz_formats import formats as core_formats

# A worker builds nothing (the parent builds every seed first) but imports torch, diffusers and transformers.
WORKER_START_S = 300.0
SHOWN_FAILURES = 40

MANIFEST_ITEMS = [PromptItem(0, "a painting of a cat", 42, 7.5, "animals"), PromptItem(1, "a dog, running", 7),
                  PromptItem(2, "starry night", 1234, 5.0, "art")]
MANIFEST_ERASURES = [{"file": "vangogh.safetensors", "strength": 1.0, "method": "uce"}]
MANIFEST_SETTINGS = {"model": "shapes", "steps": 4}


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def _write_manifest(folder: Path) -> None:
    from .batch import Manifest

    manifest = Manifest(folder / "batch", MANIFEST_ITEMS, MANIFEST_ERASURES, MANIFEST_SETTINGS)
    try:
        for item in MANIFEST_ITEMS:
            manifest.save(item, [(".png", _png())], MANIFEST_ERASURES, "in-process")
    finally:
        manifest.close()


def _load_manifest(folder: Path) -> dict:
    from .batch import Manifest

    manifest = Manifest(folder / "batch", MANIFEST_ITEMS, MANIFEST_ERASURES, MANIFEST_SETTINGS)
    manifest.close()
    return manifest.done


# An API-format workflow as `erasekit batch --workflow` takes it: a sampler, its prompt, an erasure node.
WORKFLOW = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "placeholder", "clip": ["1", 1]}},
    "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
    "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "5": {"class_type": "KSampler", "inputs": {
        "model": ["9", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 0,
        "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
    "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "erasekit_batch"}},
    "9": {"class_type": "EraseKitEraseConcepts", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "method": "uce", "concepts": "circle", "guide": "", "preserve": "",
        "strength": 1.0}},
}


def _write_workflow(folder: Path) -> None:
    (folder / "workflow_api.json").write_text(json.dumps(WORKFLOW, indent=1), encoding="utf-8")


def _load_workflow(folder: Path) -> dict:
    """The workflow as `batch` reads it, and the prompt it would queue for one item."""
    from .batch import Workflow

    workflow = Workflow.load(folder / "workflow_api.json")
    workflow.check_items(MANIFEST_ITEMS)
    return {"workflow": workflow, "queued": workflow.for_item(MANIFEST_ITEMS[0])}


def formats() -> list[Format]:
    """Every file format the pack reads: the core's (testing/fuzz_formats.py), the batch manifest and workflow."""
    return core_formats() + [
        Format("batch-manifest", _write_manifest, ("batch/manifest.jsonl",), _load_manifest),
        Format("batch-workflow", _write_workflow, ("workflow_api.json",), _load_workflow),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Running in worker processes


FACTORY = f"{__name__}:formats"


def _formats_of(factory: str) -> list[Format]:
    """The formats a ``module:function`` returns: a worker process rebuilds them by name (functions do not pickle)."""
    module, _, function = factory.partition(":")
    return getattr(importlib.import_module(module), function)()


def _quiet_libraries() -> None:
    """transformers logs a warning for every mutated config.json it is given; the outcome already says it."""
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
    except ImportError:
        pass


def _worker(connection, work: str, todo: list[tuple[str, int]], timeout: float, factory: str) -> None:
    _quiet_libraries()
    fuzzer = Fuzzer(_formats_of(factory), work, timeout)
    for name, seed in todo:
        fuzzer.seed(name)  # already built by the parent: loads the original, outside the case's time
        connection.send("start")
        try:
            connection.send(fuzzer.run(Case(name, seed)).as_dict())
        except Exception:  # the fuzzer's own bug (a mutation, a seed): the run stops and says so
            connection.send({"fuzzer_error": traceback.format_exc()})
            break
    connection.close()


def run_isolated(todo: Sequence[Case], work: Path, timeout: float, factory: str = FACTORY) -> Iterator[Result]:
    """Each case's result, run in a worker process; a worker that dies or hangs is one case's `crash` or `timeout`,
    and a fresh worker goes on from the next case. `factory`: the ``module:function`` giving the formats; their
    seeds must already be built under `work` (`Fuzzer.seed`)."""
    context = multiprocessing.get_context("spawn")  # a fork would inherit torch's thread pools mid-state
    remaining = list(todo)
    while remaining:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=(send, str(work), [(c.format, c.seed) for c in remaining],
                                                        timeout, factory), daemon=True)
        process.start()
        send.close()
        finished = 0
        for case in remaining:
            result = _next_result(receive, process, case, timeout)
            finished += 1
            yield result
            if result.outcome in ("crash", "timeout"):
                break
        _stop(process)
        receive.close()
        remaining = remaining[finished:]


def _next_result(receive, process, case: Case, timeout: float) -> Result:
    try:
        if not receive.poll(WORKER_START_S):
            return Result(case, "?", "?", "timeout", f"the worker did not start the case in {WORKER_START_S:g} s")
        receive.recv()  # "start"
        if not receive.poll(timeout + 10):  # the worker's own alarm stops Python code; this, native code
            return Result(case, "?", "?", "timeout", f"no answer within {timeout + 10:g} s (native code)")
        answer = receive.recv()
        if "fuzzer_error" in answer:
            raise RuntimeError(f"the fuzzer itself failed on {case.replay}:\n{answer['fuzzer_error']}")
    except EOFError:
        process.join(5)
        return Result(case, "?", "?", "crash", f"the worker process died (exit code {process.exitcode})")
    return Result(case, answer["target"], answer["mutation"], answer["outcome"], answer["detail"])


def _stop(process) -> None:
    if process.is_alive():
        process.kill()
    process.join(5)


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def failure_kind(result: Result) -> str:
    """What a fix addresses: the exception and where it was raised for `untyped`; the mutation otherwise."""
    if result.outcome == "untyped":
        name, _, rest = result.detail.partition(":")
        at = rest.rpartition("(at ")[2].rstrip(")")
        return f"untyped {name} at {at}"
    return f"{result.outcome} after {result.mutation}"


def summarise(results: Sequence[Result], names: Sequence[str]) -> dict:
    counts = {name: dict.fromkeys(OUTCOMES, 0) for name in names}
    kinds: dict[str, Counter] = {name: Counter() for name in names}
    for result in results:
        counts[result.case.format][result.outcome] += 1
        if result.failed:
            kinds[result.case.format][failure_kind(result)] += 1
    return {
        "counts": counts,
        "failures": sum(r.failed for r in results),
        "top_failure_kinds": {name: kinds[name].most_common(8) for name in names if kinds[name]},
        "failed_cases": [r.as_dict() for r in results if r.failed],
    }


def table(counts: dict[str, dict[str, int]]) -> str:
    width = max(len("format"), *(len(name) for name in counts))
    head = f"{'format':<{width}} " + " ".join(f"{o:>{max(len(o), 6)}}" for o in OUTCOMES) + f" {'total':>6}"
    lines = [head, "-" * len(head)]
    totals = dict.fromkeys(OUTCOMES, 0)
    for name, row in counts.items():
        lines.append(f"{name:<{width}} " + " ".join(f"{row[o]:>{max(len(o), 6)}}" for o in OUTCOMES)
                     + f" {sum(row.values()):>6}")
        for outcome in OUTCOMES:
            totals[outcome] += row[outcome]
    lines.append(f"{'all':<{width}} " + " ".join(f"{totals[o]:>{max(len(o), 6)}}" for o in OUTCOMES)
                 + f" {sum(totals.values()):>6}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m erasekit.cli.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-format", type=int, default=100, help="mutated files per format (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: the same seed, the same cases")
    parser.add_argument("--format", action="append", default=None, metavar="NAME",
                        help="only this format (repeatable); default every format")
    parser.add_argument("--replay", metavar="FORMAT#SEED", help="run one case again in this process, with its "
                        "traceback if it failed untyped")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it is a timeout")
    parser.add_argument("--summary", type=Path, default=Path("fuzz-summary.json"), help="the JSON summary's path")
    parser.add_argument("--in-process", action="store_true",
                        help="run the cases in this process (faster; a crash ends the run)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    known = [f.name for f in formats()]
    names = args.format or known
    unknown = [n for n in names if n not in known]
    if unknown or args.per_format < 1:
        print(f"error: unknown format {unknown[0]!r}; the formats: {', '.join(known)}" if unknown
              else "error: --per-format must be at least 1", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="erasekit-fuzz-"))
    try:
        return _replay(args, work) if args.replay else _run(args, names, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _replay(args, work: Path) -> int:
    try:
        case = Case.parse(args.replay)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    fuzzer = Fuzzer(formats(), work, args.timeout)
    if case.format not in fuzzer.formats:
        print(f"error: no format {case.format!r}; the formats: {', '.join(fuzzer.formats)}", file=sys.stderr)
        return 2
    _quiet_libraries()
    result = fuzzer.run(case)
    print(f"{case.replay}: {result.target} {result.mutation} -> {result.outcome} {result.detail}")
    if result.outcome == "untyped":
        here, _, _ = fuzzer.prepare(case)
        try:
            fuzzer.formats[case.format].load(here)
        except Exception:
            traceback.print_exc()
    return 1 if result.failed else 0


def _with_progress(results: Iterator[Result], total: int) -> Iterator[Result]:
    """The results as they come, with a line on stderr as each format's cases end: a long run shows it is alive."""
    started, count, failed, current = time.perf_counter(), 0, 0, None

    def done() -> None:
        if current is not None:
            print(f"  {current}: done ({count}/{total} cases, {failed} failures, "
                  f"{time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    for result in results:
        if result.case.format != current:
            done()
        current = result.case.format
        count, failed = count + 1, failed + result.failed
        yield result
    done()


def _run(args, names: Sequence[str], work: Path) -> int:
    _quiet_libraries()
    fuzzer = Fuzzer(formats(), work, args.timeout)
    started = time.perf_counter()
    for name in names:
        fuzzer.seed(name)  # a seed that does not build or load is the fuzzer's bug: a traceback, here
    todo = cases(names, args.per_format, args.seed)
    runner = (fuzzer.run(case) for case in todo) if args.in_process else run_isolated(todo, work, args.timeout)
    results = list(_with_progress(runner, len(todo)))
    summary = {"seed": args.seed, "per_format": args.per_format, "timeout_s": args.timeout,
               "seconds": round(time.perf_counter() - started, 1), **summarise(results, names)}
    print(table(summary["counts"]))
    failed = [r for r in results if r.failed]
    for result in failed[:SHOWN_FAILURES]:
        print(f"FAIL {result.outcome:<18} {result.case.format}: {result.mutation} of {result.target}: "
              f"{result.detail[:160]}\n     replay: python -m erasekit.cli.fuzz --replay '{result.case.replay}'")
    if len(failed) > SHOWN_FAILURES:
        print(f"... and {len(failed) - SHOWN_FAILURES} more failures in {args.summary}")
    for name, kinds in summary["top_failure_kinds"].items():
        print(f"{name}: " + "; ".join(f"{kind} ×{n}" for kind, n in kinds[:4]))
    write_atomic(args.summary, json.dumps(summary, indent=1) + "\n")
    print(f"{len(results)} cases in {summary['seconds']} s, {len(failed)} failures; summary: {args.summary}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
