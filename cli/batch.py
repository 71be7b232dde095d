"""`erasekit batch`: one image per prompt of a prompt list (erasers/io/prompt_lists.py), with erasures applied, on one
or several ComfyUI servers or in-process (the shapes world, or a diffusers SD1.x/SD2.x/SDXL folder); resumable.

The output folder holds NNNNN.png per prompt (NNNNN: the prompt's index in the list; NNNNN_K.png when the workflow
saves several images) and manifest.jsonl, one JSON line per finished prompt: index, prompt, seed, guidance,
categories, erasures, files, server. Files are written under a temporary name and renamed, and a prompt counts as
done only when its manifest line is written and its files exist: rerunning the same command after an interruption
(a kill, a server gone) generates only what is missing, never twice, and never rewrites a finished file. One run
at a time per folder: a run holds a lock on DIR/.erasekit-batch.lock (fcntl.flock, which the kernel releases when
the process ends, so a killed run's lock is free again), and a second run on DIR is refused. Every PNG carries a
tEXt chunk `erasekit_erasures`: the erasures applied, as JSON.

ComfyUI backend: an API-format workflow (ComfyUI's "Save (API Format)" / "Export (API)"), changed per prompt by
these rules:
- the prompt goes into the `text` (and `text_g` / `text_l`) inputs of the nodes titled "prompt" (their title in
  ComfyUI, `_meta.title` in the file); without such a node, of the nodes the samplers' `positive` inputs come
  from, which must all have a text input (CLIPTextEncode, typically; SDXL's base and refiner encoders both);
- an EraseKit Prompt List node in that place (titled "prompt", or feeding a sampler's `positive`) gets the prompt
  as its whole list (`prompts`; `file` cleared, `start` and `count` 0), so it makes a batch of one: the workflow
  that batches a list inside ComfyUI runs one prompt per queue item here, each image as the node would make it
  with that prompt alone. Such a node cannot take an empty prompt or one with a line break (a list has one
  prompt per line), so a prompt list with those is refused before anything runs;
- the prompt's seed goes into every `seed` and `noise_seed` input that holds a number (KSampler, KSamplerAdvanced,
  SamplerCustom, RandomNoise, the Prompt List's seed), and a CSV row's guidance, if it has one, into every `cfg`
  input;
- the erasures recorded are the EraseKit nodes that the output nodes depend on and that output a MODEL or CLIP,
  with their constant inputs (method, concepts, file, strength, ...).
Prompts are shared among the servers through one queue (a worker thread per server, one prompt in flight each). A
server that does not answer at the start is reported as a warning and the run goes on with the others (all of them
down is an error); one that dies midway hands its prompt back to the others.
"""
from __future__ import annotations

import copy
import fcntl
import http.client
import inspect
import io
import json
import os
import queue
import struct
import sys
import threading
import time
import urllib.error
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..erasers.errors import InputError
from ..erasers.files import SUFFIX, write_atomic
from ..erasers.io.prompt_lists import PromptItem
from .comfy_server import ComfyClient, ComfyError
from .pipelines import load_pipeline, parse_device

MANIFEST = "manifest.jsonl"
LOCK = ".erasekit-batch.lock"
PNG_KEY = "erasekit_erasures"
PROMPT_TITLE = "prompt"
TEXT_INPUTS = ("text", "text_g", "text_l")
PROMPT_LIST = "EraseKitPromptList"  # nodes/prompt_list.py: its `prompts` input is the list, one prompt per line
SEED_INPUTS = ("seed", "noise_seed")
DEFAULT_SERVER = "http://127.0.0.1:8188"
# A server that stops answering: refused or reset connections, timeouts, a response cut short.
SERVER_GONE = (OSError, http.client.HTTPException)


class BatchError(InputError):
    """A workflow, output folder or server the batch cannot run with; the message says what to change."""


# --- output folder ----------------------------------------------------------------------------------------------


def add_png_text(png: bytes, key: str, text: str) -> bytes:
    """`png` with a tEXt chunk key=text right after the header; every other chunk (ComfyUI's prompt and workflow)
    is kept byte for byte. `text` must be Latin-1 (JSON with ASCII escapes is)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    body = key.encode("latin-1") + b"\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return png[:33] + chunk + png[33:]  # 33: signature (8) + IHDR chunk (4 + 4 + 13 + 4)


class Manifest:
    """DIR/manifest.jsonl. Opening it keeps the lines whose files all exist (the first per index) and drops the rest
    (a line cut short by a kill, files deleted since), so each line left is a prompt complete on disk. `settings`
    (the in-process backend's model, steps, size, negative prompt) go into every line, and a line made with other
    settings stops a resume as other erasures do."""

    def __init__(self, out: Path, items: list[PromptItem], erasures: list[dict], settings: dict | None = None):
        self.out, self.path, self.settings = out, out / MANIFEST, dict(settings or {})
        if out.is_dir() and not self.path.exists() and any(p.name != LOCK for p in out.iterdir()):
            raise BatchError(f"{out} holds files but no {MANIFEST}, so it is not a batch's folder: give a new or "
                             "empty folder (batch would overwrite files named like its own)")
        out.mkdir(parents=True, exist_ok=True)
        self._run_lock = RunLock(out)
        try:
            self._open(items, erasures)
        except BaseException:
            self._run_lock.release()
            raise

    def _open(self, items: list[PromptItem], erasures: list[dict]) -> None:
        out = self.out
        for stray in out.glob(f".*{SUFFIX}"):  # temporary files of a killed run
            stray.unlink()
        self.done: dict[int, dict] = {}
        listed = {item.index: item for item in items}
        if self.path.exists():
            for number, raw in enumerate(self.path.read_bytes().splitlines(), 1):
                try:  # a damaged line is an item not done: it is generated again
                    record = finite_json(raw.decode("utf-8"))
                    index, files = record["index"], record["files"]
                except (ValueError, KeyError, TypeError):
                    continue
                self._check_entry(index, files, number)
                self._check(record, number, listed.get(index), erasures)
                if index not in self.done and all((out / name).is_file() for name in files):
                    self.done[index] = record
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.done.values()).encode())
        self._file = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def _check_entry(self, index, files, number: int) -> None:
        """A line's index is a whole number and its files are plain names in DIR: a line naming a file elsewhere
        would count a prompt as done whose image is not in DIR."""
        where = f"{self.path} line {number}"
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise BatchError(f"{where}: 'index' is {json.dumps(index)[:80]}, not a prompt's index (a whole number "
                             ">= 0): the manifest was edited or is not batch's; delete the line to redo its prompt")
        for name in files if isinstance(files, list) else [files]:
            if not (isinstance(files, list) and isinstance(name, str) and Path(name).name == name
                    and name not in ("", ".", "..")):
                raise BatchError(f"{where}: 'files' holds {json.dumps(name)[:80]}, not a file name in {self.out}: "
                                 "the manifest was edited or is not batch's; delete the line to redo its prompt")

    def _check(self, record: dict, number: int, item: PromptItem | None, erasures: list[dict]) -> None:
        where = f"{self.path} line {number}"
        if item is not None and [record.get(k) for k in ("prompt", "seed", "guidance")] != \
                [item.prompt, item.seed, item.guidance]:
            raise BatchError(
                f"{where} records prompt {item.index} as {record.get('prompt')!r} (seed {record.get('seed')}), but "
                f"the prompt list has {item.prompt!r} (seed {item.seed}): this folder holds another batch; use "
                "another --out, or the same prompt file and --seed to resume it")
        if record.get("erasures") != erasures:
            raise BatchError(f"{where} was generated with other erasures ({json.dumps(record.get('erasures'))}, "
                             f"now {json.dumps(erasures)}): use another --out, or the same erasures to resume it")
        for key, value in self.settings.items():
            if key in record and record[key] != value:  # lines written before a setting was recorded pass
                raise BatchError(f"{where} was generated with {key} {json.dumps(record[key])} (now {json.dumps(value)}"
                                 f"): use another --out, or the same {key} to resume it")

    def save(self, item: PromptItem, images: list[tuple[str, bytes]], erasures: list[dict], server: str) -> list[str]:
        """Write the item's images (PNGs with the erasures chunk) and then its manifest line; return the names."""
        names = []
        for k, (suffix, data) in enumerate(images, 1):
            name = f"{item.index:05d}{'' if len(images) == 1 else f'_{k}'}{suffix}"
            if suffix.lower() == ".png":
                data = add_png_text(data, PNG_KEY, json.dumps(erasures))
            write_atomic(self.out / name, data)
            names.append(name)
        record = {"index": item.index, "prompt": item.prompt, "seed": item.seed, "guidance": item.guidance,
                  "categories": item.categories, "erasures": erasures, "files": names, "server": server,
                  **self.settings}
        with self._lock:
            if not self._file.closed:  # closed: the run was interrupted; the files are redone on resume
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()  # a kill after this keeps the line (the kernel has it)
                self.done[item.index] = record
        return names

    def close(self) -> None:
        with self._lock:
            self._file.close()
        self._run_lock.release()


class RunLock:
    """An exclusive lock on DIR/.erasekit-batch.lock for one run, so that two runs on one folder cannot interleave
    their manifest lines; the kernel drops it when the process ends, so a killed run's lock is taken over. The file
    is removed when the run ends, so a finished folder holds only the batch's own files."""

    def __init__(self, out: Path):
        self.path = out / LOCK
        self._fd: int | None = None
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise BatchError(f"another batch run (pid {holder}) is writing to {out}: wait for it to finish, or "
                                 "give this run another --out") from None
            if self._is_current(fd):
                self._fd = fd
            else:
                os.close(fd)  # the run before removed the file while we waited: lock the new one
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: a run that opened it sees it gone and retries
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


@dataclass
class Summary:
    """A run's counts, and its progress lines and errors as they happen (worker threads share one)."""

    total: int
    earlier: int  # found done in the manifest
    generated: int = 0
    errors: list[str] = field(default_factory=list)  # each stopped a server or the whole batch
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def missing(self) -> int:
        return self.total - self.earlier - self.generated

    def finished(self, names: list[str], where: str) -> None:
        with self._lock:
            self.generated += 1
            rate = self.generated / max(time.monotonic() - self.started, 1e-9)
            print(f"[{self.earlier + self.generated}/{self.total}] {', '.join(names)} from {where}  "
                  f"({rate * 60:.1f}/min, {self.missing / rate:.0f} s left)", flush=True)

    def failed(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
        print(f"error: {message}", file=sys.stderr, flush=True)


# --- ComfyUI backend --------------------------------------------------------------------------------------------


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)



def finite_json(text: str):
    """JSON as Python's json reads it, except that NaN, Infinity and numbers beyond float's range (1e999) are a
    ValueError: ComfyUI would take them as a cfg or strength and draw black images."""
    def refuse(constant: str):
        raise ValueError(f"{constant} is not a finite number")

    def number(literal: str) -> float:
        value = float(literal)
        if value in (float("inf"), float("-inf")):
            refuse(literal)
        return value

    return json.loads(text, parse_constant=refuse, parse_float=number)

class Workflow:
    """An API-format workflow and the inputs each prompt list item changes (rules: module docstring)."""

    def __init__(self, prompt: dict, name: str = "the workflow"):
        if not isinstance(prompt, dict) or not prompt:
            raise BatchError(f"{name} is not an API-format workflow (a JSON object of nodes)")
        if "nodes" in prompt and "links" in prompt:
            raise BatchError(f"{name} is a UI workflow (what ComfyUI's Save writes); batch needs the API format: "
                             "export it with Workflow → Export (API), or 'Save (API Format)' in the old menu (turn "
                             "on the dev mode options in the settings)")
        bad = [key for key, node in prompt.items() if not (isinstance(node, dict) and isinstance(
            node.get("class_type"), str) and isinstance(node.get("inputs"), dict))]
        if bad:
            raise BatchError(f"{name} is not an API-format workflow: entry {bad[0]!r} is not a node "
                             "({'class_type': ..., 'inputs': {...}})")
        self.prompt, self.name = prompt, name
        self.text_nodes = self._text_nodes()
        self.seeds = [(node_id, key) for node_id, node in prompt.items() for key in SEED_INPUTS
                      if _number(node["inputs"].get(key))]
        if not self.seeds:
            raise BatchError(f"{name} has no sampler seed to set (no node has a 'seed' or 'noise_seed' number "
                             "input): add a KSampler, or give its seed a number")
        self.cfgs = [node_id for node_id, node in prompt.items() if _number(node["inputs"].get("cfg"))]

    @classmethod
    def load(cls, path: str | Path) -> "Workflow":
        path = Path(path)
        try:
            prompt = finite_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BatchError(f"no workflow file {path}") from None
        except OSError as err:
            raise BatchError(f"workflow file {path} cannot be read ({err.strerror or err})") from None
        except ValueError as err:  # UnicodeDecodeError included
            raise BatchError(f"{path} is not JSON in UTF-8 ({str(err)[:200]})") from None
        return cls(prompt, str(path))

    def _text_nodes(self) -> list[str]:
        texts = {node_id for node_id, node in self.prompt.items()
                 if any(isinstance(node["inputs"].get(key), str) for key in TEXT_INPUTS)
                 or self._is_prompt_list(node_id)}
        titled = sorted(node_id for node_id in texts if str(
            (self.prompt[node_id].get("_meta") or {}).get("title", "")).strip().lower() == PROMPT_TITLE)
        if titled:
            return titled
        sources = sorted({node["inputs"]["positive"][0] for node in self.prompt.values()
                          if _is_link(node["inputs"].get("positive"))})
        if sources and set(sources) <= texts:
            return sources
        found = ", ".join(f"node {s} ({self.prompt.get(s, {}).get('class_type', 'missing')})" for s in sources)
        raise BatchError(
            f"{self.name}: cannot tell which node takes the prompt: no node with a text input is titled "
            f"{PROMPT_TITLE!r}, and the samplers' positive inputs come from {found or 'no node'}; in ComfyUI, "
            f"rename the prompt's text-encode node to {PROMPT_TITLE!r} (right-click → Title) and export again")

    def _is_prompt_list(self, node_id: str) -> bool:
        return self.prompt[node_id]["class_type"] == PROMPT_LIST

    def check_items(self, items: list[PromptItem]) -> None:
        """Raise if a Prompt List node takes the prompt and some prompt is one it cannot hold alone."""
        if not any(self._is_prompt_list(node_id) for node_id in self.text_nodes):
            return
        for item in items:
            if not item.prompt.strip() or "\n" in item.prompt or "\r" in item.prompt:
                raise BatchError(
                    f"prompt {item.index} ({item.prompt!r}) is empty or has a line break, which the EraseKit Prompt "
                    f"List node in {self.name} cannot take as one prompt (it reads one prompt per line): use a "
                    "workflow whose prompt goes into a CLIPTextEncode node, or leave such rows out (--start, "
                    "--count, or an edited list)")

    def for_item(self, item: PromptItem) -> dict:
        prompt = copy.deepcopy(self.prompt)
        for node_id in self.text_nodes:
            inputs = prompt[node_id]["inputs"]
            if self._is_prompt_list(node_id):  # the whole list is this one prompt: a batch of one
                inputs.update(prompts=item.prompt, file="", start=0, count=0)
                continue
            for key in TEXT_INPUTS:
                if isinstance(inputs.get(key), str):
                    inputs[key] = item.prompt
        for node_id, key in self.seeds:
            prompt[node_id]["inputs"][key] = item.seed
        if item.guidance is not None:
            for node_id in self.cfgs:
                prompt[node_id]["inputs"]["cfg"] = item.guidance
        return prompt

    def check(self, info: dict, url: str) -> list[str]:
        """Raise unless the server at `url` (its /object_info) knows every node type; return the output nodes."""
        for node_id, node in self.prompt.items():
            kind = node["class_type"]
            if kind not in info:
                hint = " (EraseKit's nodes: clone this pack into ComfyUI/custom_nodes/)" if kind.startswith(
                    "EraseKit") else ""
                raise BatchError(f"ComfyUI at {url} has no node type {kind!r} (node {node_id} of {self.name}): "
                                 f"install the custom nodes that provide it there{hint} and restart ComfyUI")
        outputs = sorted(node_id for node_id, node in self.prompt.items()
                         if info[node["class_type"]].get("output_node"))
        if not outputs:
            raise BatchError(f"{self.name} has no output node (Save Image or similar), so ComfyUI would make no "
                             "image: add a Save Image node after VAE Decode and export again")
        return outputs

    def erasures(self, info: dict, outputs: list[str]) -> list[dict]:
        """The EraseKit nodes the outputs depend on that change a MODEL or CLIP, with their constant inputs."""
        needed, todo = set(), list(outputs)
        while todo:
            node_id = todo.pop()
            if node_id in needed or node_id not in self.prompt:
                continue
            needed.add(node_id)
            todo += [value[0] for value in self.prompt[node_id]["inputs"].values() if _is_link(value)]
        found = []
        for node_id in sorted(needed, key=lambda k: (len(k), k)):
            node = self.prompt[node_id]
            kind = node["class_type"]
            if kind.startswith("EraseKit") and {"MODEL", "CLIP"} & set(info[kind].get("output", [])):
                found.append({"node": node_id, "type": kind,
                              "inputs": {k: v for k, v in node["inputs"].items() if not _is_link(v)}})
        return found


def _server_info(client: ComfyClient) -> dict:
    try:
        return client.object_info()
    except SERVER_GONE as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise BatchError(f"cannot reach ComfyUI at {client.url} ({reason}): start ComfyUI there (python main.py "
                         "--listen ... --port ...) or fix --server") from None
    except (ComfyError, ValueError) as err:
        raise BatchError(f"{client.url} does not answer like a ComfyUI server (/object_info: {err}); "
                         "check --server") from None


def _live_servers(clients: list[ComfyClient]) -> tuple[list[ComfyClient], list[dict]]:
    """The servers that answer and their /object_info; each one that does not is a warning, all of them an error."""
    live, infos, refusals = [], [], []
    for client in clients:
        try:
            infos.append(_server_info(client))
            live.append(client)
        except BatchError as err:
            refusals.append(err)
    if not live:
        raise refusals[0] if len(refusals) == 1 else BatchError(
            "no ComfyUI server answers: " + "; ".join(str(err) for err in refusals))
    for err in refusals:
        print(f"warning: {err}; going on with the {len(live)} server(s) that answer", file=sys.stderr, flush=True)
    return live, infos


def run_comfy(workflow: Workflow, items: list[PromptItem], out: Path, clients: list[ComfyClient],
              timeout: float = 1800) -> Summary:
    """Generate every item not yet in DIR's manifest, sharing them among the servers."""
    if not clients:
        raise BatchError("no ComfyUI server given (--server URL)")
    clients, infos = _live_servers(clients)
    outputs = [workflow.check(info, client.url) for info, client in zip(infos, clients)][0]
    workflow.check_items(items)
    erasures = workflow.erasures(infos[0], outputs)
    manifest = Manifest(out, items, erasures)
    todo = [item for item in items if item.index not in manifest.done]
    summary = Summary(len(items), len(items) - len(todo))
    print(f"{len(items)} prompts: {summary.earlier} done earlier, {len(todo)} to generate on "
          f"{len(clients)} server(s); erasures: {json.dumps(erasures) if erasures else 'none'}", flush=True)
    pending: queue.Queue[PromptItem] = queue.Queue()
    for item in todo:
        pending.put(item)
    stop = threading.Event()

    def serve(client: ComfyClient) -> None:
        while not stop.is_set() and summary.missing:
            try:
                item = pending.get(timeout=0.2)  # an item another server gave back may still come
            except queue.Empty:
                continue
            try:
                entry = client.run(workflow.for_item(item), timeout)
                images = [(Path(name).suffix, data) for name, data in client.image_files(entry)]
                if not images:
                    raise ComfyError(f"the output nodes returned no image; end {workflow.name} with a Save Image node")
            except SERVER_GONE as err:
                pending.put(item)
                summary.failed(f"ComfyUI at {client.url} stopped answering ({err}) at prompt {item.index}; "
                               "it goes to the other servers, if any")
                return
            except (ComfyError, ValueError) as err:
                stop.set()  # the workflow fails: every other prompt would too
                summary.failed(f"prompt {item.index} failed on {client.url}: {err}")
                return
            summary.finished(manifest.save(item, images, erasures, client.url), client.url)

    threads = [threading.Thread(target=serve, args=(client,), daemon=True) for client in clients]
    for thread in threads:
        thread.start()
    try:
        while any(thread.is_alive() for thread in threads):
            time.sleep(0.2)  # join() in slices keeps Ctrl-C working
    finally:
        stop.set()
        manifest.close()
    return summary


# --- diffusers backend (the shapes world or a diffusers model folder) --------------------------------------------


DEFAULT_STEPS = 30  # sampler steps on a diffusers model folder without --steps


def load_model(model: str | Path | None = None, device: str = "cpu") -> tuple[object, str, str]:
    """(pipeline, kind, name) for --model: a diffusers folder (model_index.json) → a StableDiffusionPipeline ("sd")
    or StableDiffusionXLPipeline ("sdxl"), local files only, no safety checker; a shapes-world folder (default: the
    shipped one) → a ShapesPipeline ("shapes", CPU only). `name`: the folder's name, recorded in the manifest."""
    from ..shapes.model import WEIGHTS_DIR

    path = Path(WEIGHTS_DIR if model is None else model)
    parsed = torch_device(device)
    if not (path / "model_index.json").is_file() and parsed.type != "cpu":
        raise BatchError(f"--device {device}: the shapes world runs on the CPU only; --device is for a diffusers "
                         "model folder (one with model_index.json)")
    try:
        pipe, kind = load_pipeline(path, parsed, kinds=("shapes", "sd", "sdxl"), user="batch")
    except ValueError as err:
        raise BatchError(str(err)) from None
    return pipe, kind, path.resolve().name


def torch_device(device: str):
    """parse_device's torch device, its ValueError as a BatchError."""
    try:
        return parse_device(device)
    except ValueError as err:
        raise BatchError(str(err)) from None


def run_diffusers(items: list[PromptItem], out: Path, model: str | Path | None = None, erasure_files=(),
                  membrane_files=(), steps: int | None = None, guidance: float | None = None,
                  chunk: int = 16, *, negative: str | None = None, width: int | None = None,
                  height: int | None = None, device: str = "cpu") -> Summary:
    """The same batch in-process, with EraseKit erasure files attached (merged into the UNet weights) and SPM
    membranes (Facilitated Transport per sample), on a shapes-world model (default: the shipped one; `chunk`
    prompts per call) or a diffusers SD1.x/SD2.x/SDXL folder (one prompt per call). Each image depends on its own
    row's seed only: the same seed gives the same image whatever else is in the batch or was done earlier."""
    import torch
    from PIL import Image

    from ..erasers import diffusers_adapter, spm
    from ..erasers.erasure import Erasure
    from ..erasers.spm import hooks as spm_diffusers
    from ..shapes.model import GUIDANCE, SAMPLE_STEPS

    bad = [f"--{k} {v}" for k, v in (("steps", steps), ("width", width), ("height", height)) if v is not None and v < 1]
    if bad:
        raise BatchError(f"{', '.join(bad)}: must be a positive number")
    pipe, kind, name = load_model(model, device)
    if kind == "shapes" and (width or height):
        raise BatchError("--width/--height: the shapes world draws 32×32 images only; they are for a diffusers "
                         "model folder")
    records = []
    for path in map(Path, erasure_files):
        erasure = Erasure.load(path)
        diffusers_adapter.attach(pipe, erasure)  # FamilyMismatchError naming both families
        records.append({"type": "erasure", "file": path.name, "method": erasure.method,
                        "concepts": erasure.concepts, "strength": 1.0})
    membranes = [spm.load_membrane(path) for path in membrane_files]
    if membranes:
        spm_diffusers.attach_membranes(pipe, membranes)
    records += [{"type": "membrane", "file": Path(path).name, "method": "spm", "concepts": membrane.concepts,
                 "strength": 1.0, "facilitated_transport": True} for path, membrane in zip(membrane_files, membranes)]
    if kind == "shapes":
        steps, default = steps or SAMPLE_STEPS, GUIDANCE if guidance is None else guidance
        settings = {"model": name, "steps": steps, "negative": negative or None}  # "" and none: the same image
    else:
        steps = steps or DEFAULT_STEPS
        default = inspect.signature(pipe.__call__).parameters["guidance_scale"].default if guidance is None \
            else guidance
        scale_factor = pipe.vae_scale_factor
        width = width or pipe.unet.config.sample_size * scale_factor
        height = height or pipe.unet.config.sample_size * scale_factor
        if width % 8 or height % 8:
            raise BatchError(f"--width {width} --height {height}: both must be multiples of 8")
        settings = {"model": name, "steps": steps, "width": width, "height": height, "negative": negative}
    manifest = Manifest(out, items, records, settings)
    todo = [item for item in items if item.index not in manifest.done]
    summary = Summary(len(items), len(items) - len(todo))
    print(f"{len(items)} prompts: {summary.earlier} done earlier, {len(todo)} to generate in-process on {name} "
          f"({kind}, {device}); erasures: {json.dumps(records) if records else 'none'}", flush=True)

    def save(item: PromptItem, image) -> None:
        png = io.BytesIO()
        (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(png, format="PNG")
        summary.finished(manifest.save(item, [(".png", png.getvalue())], records, "in-process"), "in-process")

    try:
        if kind == "shapes":  # each image depends on its own seed only (ShapesPipeline), so prompts go in chunks
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                for scale in sorted({default if i.guidance is None else i.guidance for i in part}):
                    group = [i for i in part if (default if i.guidance is None else i.guidance) == scale]
                    images = pipe([i.prompt for i in group], [i.seed for i in group], steps=steps, guidance=scale,
                                  negative=negative or "")
                    for item, image in zip(group, images):
                        save(item, image)
        else:  # one prompt per call: a batched UNet call need not round like a single one
            for item in todo:
                generator = torch.Generator(torch_device(device)).manual_seed(item.seed)
                image = pipe(item.prompt, negative_prompt=negative, num_inference_steps=steps,
                             guidance_scale=default if item.guidance is None else item.guidance,
                             width=width, height=height, generator=generator).images[0]
                save(item, image)
    finally:
        manifest.close()
    return summary
