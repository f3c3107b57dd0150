"""#28: every shell command in README.md and docs/**/*.md is run by a test.

Each command of a ```bash / ```sh / ```shell / ```console block is one param, with the id
``<file>:<line>`` (``README.md:130``, ``docs/guides/lora.md:12``). A command is one line (``$ ``
prompts stripped; in ```console blocks only the ``$ `` lines are commands, the rest is output),
with ``\\`` continuations joined and ``for ... done`` loops taken whole; ``#`` comments are ignored;
``a && b`` runs ``a`` then ``b`` (``cd`` into a folder of the checkout moves the rest there, ``cd`` into a
freshly cloned folder is the checkout). Each command falls in one class:

* RUN (``@pytest.mark.slow``, ~10-30 s each): ``python -m diffusion_lab.<entry>``, the console
  scripts (``dl-train``, ``dl-sample``, ...), ``python experiments/...``. They run in a fresh
  folder (the project root of the run: ``PROJECT_ROOT`` and the working folder), shrunk: training
  takes 2 steps with checkpoints, grids and validation on that grid, sampling and evaluation a few
  images in 2 steps, experiment scripts their smallest counts (or ``--help``). What a command
  reads that an earlier documented command makes (``outputs/tiny_sd``, ``outputs/ldm_digits/vae``,
  ``<run>/pipeline``, ``<demo run>``, ``outputs/ddpm_digits/runs/<date>``) comes from a
  session-wide store that runs the making command once, shrunk (PRODUCERS, PLACEHOLDERS below).
  Before that, the default suite composes every RUN command of a Hydra entry in-process
  (``test_run_command_composes``), so a wrong override fails fast without the slow suite.
* COMPOSE (default suite): recipes for a GPU or more (``trainer=gpu|ddp|fsdp|ddp_multinode``,
  ``trainer.num_nodes``, ``device=cuda``, CPU offload, ``torchrun``, ``srun``, SLURM), hub
  weights (``stabilityai/...``, ``black-forest-labs/...``), data that lives on someone's cluster
  (``/data/...``, ``DIR``, ``s3://``) or a placeholder no earlier command makes: the command's
  overrides are composed with ``hydra.compose`` and each must be in the composed config (a group
  choice in ``hydra.runtime.choices``, a value at its key).
* STATIC (default suite): ``pip install`` (the extras named exist in pyproject.toml), ``make
  <target>`` (the target is in the Makefile), ``git clone``, ``export``/``VAR=value``, ``cd``,
  ``wandb login``, ``mkdocs ...`` (mkdocs.yml exists), ``moto_server`` (installed), ``python -c``
  (compiles), ``python -m pytest`` (the paths exist).

A doc writer overrides the automatic class of a whole block with an HTML comment on the line
just before its fence (blank lines between are allowed)::

    <!-- test: compose -->      (or: run, static)
    ```bash
    python -m diffusion_lab.train experiment=my_big_run
    ```

``compose`` still needs a Hydra entry; ``static`` checks only that the command is one of the
known kinds. There is no skip: a command no rule knows fails, naming this marker. See
docs/contributing.md.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from tests.conftest import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
LANGS = {"bash", "sh", "shell", "console", "zsh"}
MARK = re.compile(r"^\s*<!--\s*test:\s*(\w+)\s*-->\s*$")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
HOW_TO_MARK = ("mark its block with <!-- test: compose --> (a Hydra command that cannot run here), "
               "<!-- test: static --> (an environment command) or <!-- test: run --> on the line "
               "before the fence (docs/contributing.md)")

HYDRA_ENTRIES = {"train", "sample", "evaluate", "prepare", "plan", "noising", "posthoc_ema"}
ARGPARSE_ENTRIES = {"tiny_sd", "lora", "doctor"}
ENV_COMMANDS = {"wandb", "huggingface-cli", "hf", "nvidia-smi", "wait", "source", "echo", "ls", "cat", "tensorboard", "mkdir"}

DEMO = "python -m diffusion_lab.train experiment=ddpm_digits"
SD_FULL = "python -m diffusion_lab.train experiment=sd_finetune_tiny"
SD_LORA = "python -m diffusion_lab.train experiment=sd_finetune_tiny adapter=lora"

# What documented commands read that another documented command makes: path under the project
# root -> the command that makes it (run once per session, shrunk, in a folder of its own).
PRODUCERS = {
    "outputs/ldm_digits/vae": "python -m diffusion_lab.train experiment=vae_digits",
    "outputs/ldm_digits/pipeline": "python -m diffusion_lab.train experiment=ldm_digits",
    "outputs/ldm_digits/lora": "python -m diffusion_lab.train experiment=ldm_digits_lora",
    "outputs/dpo_pairs": "python experiments/reward/make_pairs.py --pipeline <demo run>/pipeline --pairs 512 --out outputs/dpo_pairs",
    "outputs/dpo_pairs_t2i": "python experiments/reward/make_pairs.py --pipeline outputs/ldm_digits/pipeline --pairs 500 --out outputs/dpo_pairs_t2i",
}
TINY_PIPELINE = re.compile(r"outputs/tiny_(\w+)")  # outputs/tiny_<kind>: python -m diffusion_lab.tiny_sd ... --kind <kind>

# <placeholder> -> what stands in for it: ("artefact", path) | ("images",) | ("run",) (see _run_producer)
PLACEHOLDERS = {
    "demo run": ("run",), "run": ("run",), "run dir": ("run",), "sd run": ("run",),
    "base": ("artefact", "outputs/tiny_sd"),
    "pipeline": ("artefact", "outputs/ldm_digits/pipeline"),
    "pairs": ("artefact", "outputs/dpo_pairs_t2i"),
    "samples": ("images",), "real images": ("images",),
}
# relative files a command reads that stand for the user's own: name -> how the test makes one
USER_FILES = {"prompts.txt": "prompts", "style.safetensors": "lora_file", "my_images": "images"}

# Shrinking: a key is added (or replaces the documented value) only where the composed config has it.
SHRINK = {
    "train": ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
              "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.sample_grid.every_n_steps=2",
              "callbacks.sample_grid.num_images=4", "callbacks.progress_bar=null", "model.preview_steps=2",
              "hydra.sweeper.n_trials=2"],
    "sample": ["num_images=2", "batch_size=2", "num_inference_steps=2"],
    "evaluate": ["num_images=8", "batch_size=8", "num_inference_steps=2", "num_reference=16", "kid_subsets=2",
                 "kid_subset_size=4", "is_splits=1", "logger=none"],
    "prepare": ["prepare.num_workers=1"],
}
# experiment scripts: their smallest run (else --help)
SCRIPT_SHRINK = {
    "experiments/reward/make_pairs.py": {"--pairs": "8", "--steps": "2", "--batch-size": "8"},
    "experiments/reward/t2i_score.py": {"--per-class": "1", "--steps": "2"},
    "experiments/ldm_digits/score.py": {"--per-class": "1", "--steps": "2", "--batch-size": "10"},
    "experiments/samplers/run.py": {"--num-images": "4", "--batch-size": "4", "--settings": "<its default samplers at 2 steps>"},
}
WEIGHT_KEYS = r"pretrained|pipeline|refiner|clip|repo|name|tokenizer|model_id|path|lora"  # keys whose hub-id values download
NEEDS_WEIGHTS = {"features=inception": "the FID Inception weights file (never downloaded)"}
CLUSTER_PATH = re.compile(r"^(/data|/shared|/models|/scratch|/mnt|/home)(/|$)|^s3://|^DIR(/|$)|^\.\.\.$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LOCAL_ROOTS = ("outputs/", "experiments/", "conf/", "tests/", "data/", "docs/")


# ---------------------------------------------------------------- collecting

@dataclass
class Command:
    file: str  # relative to the repository
    line: int
    text: str  # the command, continuations joined, comments dropped
    mark: str | None  # the block's <!-- test: ... --> mark
    earlier: list[str] = field(default_factory=list)  # the commands before it in its block

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def _strip_comment(line: str) -> str:
    """``line`` without a ``#`` comment (a ``#`` at the start or after a blank, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def doc_files() -> list[Path]:
    files = [REPO / "README.md"] if (REPO / "README.md").is_file() else []
    return files + sorted((REPO / "docs").rglob("*.md"))


def commands_in(path: Path) -> list[Command]:
    rel = path.relative_to(REPO).as_posix()
    lines = path.read_text().splitlines()
    out: list[Command] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        mark = MARK.match(lines[j]).group(1) if j >= 0 and MARK.match(lines[j]) else None
        end = i + 1
        while end < len(lines) and not (lines[end].strip().startswith(fence) and not lines[end].strip().strip(fence[0])):
            end += 1
        if lang in LANGS:
            block = _block_commands(rel, lines, i + 1, end, console=lang == "console", mark=mark)
            for k, c in enumerate(block):
                c.earlier = [b.text for b in block[:k]]
            out += block
        i = end + 1
    return out


def _block_commands(rel: str, lines: list[str], start: int, end: int, console: bool, mark: str | None) -> list[Command]:
    out: list[Command] = []
    pending: tuple[int, str] | None = None  # (first line, text so far) of a command still going on
    pending_continued = False  # its last line ended with a backslash (else: a line of a loop)
    loop_depth = 0
    for n in range(start, end):
        raw = lines[n]
        stripped = raw.strip()
        if pending is None:
            if console and not stripped.startswith("$"):
                continue  # output
            stripped = re.sub(r"^\$\s?", "", stripped)
        text = _strip_comment(stripped)
        if not text:
            continue
        first = pending[0] if pending else n + 1
        continued = text.endswith("\\")
        joined = (pending[1] + (" " if pending_continued else "; ") if pending else "") + text.rstrip("\\").rstrip()
        pending_continued = continued
        if re.match(r"^(for|while|until)\b", text) and not pending:
            loop_depth += 1
        if re.search(r"(^|[;\s])done\b", text):
            loop_depth = max(0, loop_depth - 1)
        if continued or loop_depth > 0:
            pending = (first, joined)
            continue
        pending = None
        out.append(Command(rel, first, joined.strip(), mark))
    if pending:
        out.append(Command(rel, pending[0], pending[1], mark))
    return out


def all_commands() -> list[Command]:
    return [c for f in doc_files() for c in commands_in(f)]


# ---------------------------------------------------------------- parsing one command

def _split_chain(text: str) -> list[str]:
    """``a && b; c`` -> [a, b, c] (outside quotes); a trailing ``&`` (background) is dropped."""
    parts, cur, quote, i = [], "", None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
            cur += ch
        elif ch in "'\"":
            quote = ch
            cur += ch
        elif text.startswith("&&", i) or text.startswith("||", i):
            parts.append(cur)
            cur = ""
            i += 1
        elif ch in ";&":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
        i += 1
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


@dataclass
class Segment:
    kind: str  # run | compose | static | unknown
    what: str  # hydra:<entry> | argparse:<entry> | script:<path> | pip | make | ... (what checks it)
    args: list[str]  # the entry's arguments (Hydra overrides, argparse argv, script argv)
    env: dict[str, str]
    multirun: bool = False
    text: str = ""
    why: str = ""  # why compose (or unknown)


def _entry_of(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(``hydra:train`` | ``argparse:lora`` | ``script:experiments/x.py`` | ``python-c`` | ..., rest)."""
    if not tokens:
        return None
    head = tokens[0]
    if head.startswith("dl-"):
        name = head[3:].replace("-", "_")
        return (f"hydra:{name}" if name in HYDRA_ENTRIES else f"argparse:{name}"), tokens[1:]
    if re.fullmatch(r"(\S*/)?python(3(\.\d+)?)?", head):
        rest = tokens[1:]
        if rest[:1] == ["-m"] and len(rest) > 1:
            mod = rest[1]
            if mod.startswith("diffusion_lab."):
                name = mod.split(".", 1)[1]
                return (f"hydra:{name}" if name in HYDRA_ENTRIES else f"argparse:{name}"), rest[2:]
            if mod == "pip":
                return "pip", rest[2:]
            if mod == "pytest":
                return "pytest", rest[2:]
            return None
        if rest[:1] == ["-c"]:
            return "python-c", rest[1:]
        if rest and rest[0].endswith(".py"):
            return f"script:{rest[0]}", rest[1:]
    return None


def _placeholders_to_dummy(text: str) -> str:
    text = re.sub(r"<[^<>]+>", "PLACEHOLDER", text)
    return re.sub(r"\$\(.*?\)|\$\{?\w+\}?", "PLACEHOLDER", text)


def parse_segment(text: str) -> Segment:
    text_dummy = _placeholders_to_dummy(text)
    try:
        tokens = shlex.split(text_dummy)
    except ValueError as e:
        return Segment("unknown", "", [], {}, text=text, why=f"not shell syntax: {e}")
    env = {}
    while tokens and re.fullmatch(r"[A-Za-z_]\w*=.*", tokens[0]):
        k, v = tokens.pop(0).split("=", 1)
        env[k] = v
    if not tokens:
        return Segment("static", "assign", [], env, text=text)
    head = tokens[0]
    if head in ("for", "while", "until"):
        launched = [s.strip().rstrip("&").strip() for s in re.split(r";|\bdo\b|\bdone\b", text) if "torchrun" in s or "diffusion_lab." in s]
        if launched:
            seg = parse_segment(launched[0].strip())
            seg.kind, seg.why, seg.text = "compose", "a loop of launches (processes in parallel, multi-node)", text
            return seg
        return Segment("unknown", "", [], env, text=text, why="a shell loop that launches no diffusion_lab entry")
    if head in ("torchrun", "srun", "mpirun"):
        rest = tokens[1:]
        if "-m" in rest:
            k = rest.index("-m")
            found = _entry_of(["python", *rest[k:]])
            if found and found[0].startswith("hydra:"):
                return Segment("compose", found[0], _overrides(found[1]), env, text=text, why=f"{head}: several processes / nodes")
        return Segment("unknown", "", [], env, text=text, why=f"{head} without a Hydra entry")
    if head == "export":
        return Segment("static", "export", tokens[1:], env, text=text)
    if head == "cd":
        return Segment("static", "cd", tokens[1:], env, text=text)
    if head in ("pip", "pip3", "uv") or (head == "uv" and tokens[1:2] == ["pip"]):
        return Segment("static", "pip", tokens[1:], env, text=text)
    if head == "git":
        return Segment("static", "git", tokens[1:], env, text=text)
    if head == "make":
        return Segment("static", "make", tokens[1:], env, text=text)
    if head == "mkdocs":
        return Segment("static", "mkdocs", tokens[1:], env, text=text)
    if head == "moto_server":
        return Segment("static", "installed", tokens, env, text=text)
    if re.fullmatch(r"(\S*/)?pytest", head):
        return Segment("static", "pytest", tokens[1:], env, text=text)
    if head in ENV_COMMANDS:
        return Segment("static", "env", tokens, env, text=text)
    found = _entry_of(tokens)
    if not found:
        return Segment("unknown", "", tokens, env, text=text, why="no rule knows this command")
    what, args = found
    if what in ("pip", "pytest", "python-c"):
        return Segment("static", what, args, env, text=text)
    if what.startswith("script:"):
        return Segment("run", what, args, env, text=text)
    if what.startswith("argparse:"):
        name = what.split(":", 1)[1]
        if name not in ARGPARSE_ENTRIES:
            return Segment("unknown", what, args, env, text=text, why=f"diffusion_lab.{name} is not an entry point")
        hub = [a for a in args if _is_hub_id(a)]
        if hub:
            return Segment("compose", what, args, env, text=text, why=f"hub weights {hub[0]}")
        return Segment("run", what, args, env, text=text)
    multirun = "-m" in args or "--multirun" in args
    flags = {}
    for flag in ("--config-dir", "-cd", "--config-name", "-cn"):
        if flag in args[:-1]:
            k = args.index(flag)
            flags[flag.replace("-cd", "--config-dir").replace("-cn", "--config-name")] = args[k + 1]
            args = args[:k] + args[k + 2:]
    overrides = _overrides(args)
    if "--config-name" in flags:
        return Segment("unknown", what, overrides, env, text=text, why="--config-name: the harness composes conf/<entry>.yaml only")
    if "--config-dir" in flags:  # the reader's own config folder: the test makes one (USER_FILES) and searches it
        overrides.append(f"hydra.searchpath=[file://{_config_dir(flags['--config-dir'], overrides)}]")
    seg = Segment("run", what, overrides, env, multirun=multirun, text=text)
    why = _why_compose(seg)
    if why:
        seg.kind, seg.why = "compose", why
    return seg


def _config_dir(name: str, overrides: list[str], root: Path | None = None) -> Path:
    """``name`` (a folder of the reader's own configs) under ``root`` (a scratch folder unless given), with
    an ``experiment/<x>.yaml`` for each ``experiment=<x>`` that conf/ does not have."""
    root = root or Path(_scratch())
    folder = root / name
    for o in overrides:
        if o.startswith("experiment="):
            x = o.split("=", 1)[1]
            if not (Path(CONF_DIR) / "experiment" / f"{x}.yaml").is_file():
                (folder / "experiment").mkdir(parents=True, exist_ok=True)
                (folder / "experiment" / f"{x}.yaml").write_text("# @package _global_\ndefaults:\n  - override /logger: csv\n")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.cache
def _scratch() -> str:
    return tempfile.mkdtemp(prefix="documented_commands_")


def _overrides(args: list[str]) -> list[str]:
    return [a for a in args if a not in ("-m", "--multirun")]


def _is_hub_id(value) -> bool:
    return (isinstance(value, str) and bool(HUB_ID.match(value)) and not value.startswith(LOCAL_ROOTS)
            and "PLACEHOLDER" not in value and not value.startswith("placeholder") and not (REPO / value).exists())


# ---------------------------------------------------------------- composing

@functools.cache
def _compose_cached(entry: str, overrides: tuple[str, ...]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=list(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _parsed(overrides: list[str]):
    return OverridesParser.create().parse_overrides(overrides)


def _single(overrides: list[str]) -> list[str]:
    """A sweep's first value for each swept key (``hydra.compose`` takes no sweeps)."""
    out = []
    for text, o in zip(overrides, _parsed(overrides)):
        if o.is_sweep_override():
            try:
                first = next(iter(o.sweep_iterator()))
            except Exception:  # noqa: BLE001 - interval(a, b) (Optuna's search space): its lower end
                first = getattr(o.value(), "start", None)
                if first is None:
                    continue
            prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(o.type.name, "")
            out.append(f"{prefix}{o.get_key_element()}={_element(first)}")
        else:
            out.append(text)
    return out


def _element(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def compose_entry(entry: str, overrides: list[str]) -> DictConfig:
    return _compose_cached(entry, tuple(_single(overrides)))


def _why_compose(seg: Segment) -> str:
    entry = seg.what.split(":", 1)[1]
    text = seg.text
    if re.search(r"\bhydra/launcher=(slurm|submitit)", text):
        return "a SLURM launch"
    unknown = re.findall(r"<[^<>]+>|\$\(.*?\)|\$\{?\w+\}?", _known_placeholders_removed(text))
    if unknown:
        return f"a placeholder no documented command makes ({', '.join(unknown)})"
    for a in seg.args:
        value = a.split("=", 1)[1] if "=" in a else ""
        if CLUSTER_PATH.match(value):
            return f"data or weights on a cluster / in the cloud ({a})"
        if a in ("device=cuda", "prepare.device=cuda", "memory.cpu_offload=true"):
            return f"a GPU ({a})"
        if a in NEEDS_WEIGHTS:
            return f"{NEEDS_WEIGHTS[a]} ({a})"
    try:
        cfg = compose_entry(entry, _concrete_for_compose(seg.args))
    except Exception as e:  # noqa: BLE001 - the compose test reports it
        return f"(does not compose: {type(e).__name__})"
    if entry != "plan":  # plan runs on the meta device: no GPU, no download
        trainer = cfg.get("trainer") or {}
        if str(trainer.get("accelerator", "")) in ("gpu", "cuda", "mps"):
            return f"a GPU trainer (trainer.accelerator={trainer.accelerator})"
        if int(trainer.get("num_nodes", 1) or 1) > 1:
            return "several nodes"
        hub = [v for k, v in _leaves(OmegaConf.to_container(cfg, resolve=False))
               if k and re.search(WEIGHT_KEYS, str(k[-1])) and _is_hub_id(v)]
        if hub:
            return f"hub weights ({hub[0]})"
    return ""


def _known_placeholders_removed(text: str) -> str:
    text = re.sub(r"outputs/\w+/runs/<[^<>]+>", "", text)
    return re.sub(r"<(" + "|".join(map(re.escape, PLACEHOLDERS)) + r")>", "", text)


def _concrete_for_compose(overrides: list[str]) -> list[str]:
    return [o.replace("PLACEHOLDER", "placeholder") for o in overrides]


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "hydra" and not prefix:
                continue
            yield from _leaves(v, prefix + (k,))
    elif isinstance(tree, list):
        for k, v in enumerate(tree):
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, tree


_ABSENT = object()


def _at(tree, key: str):
    for part in key.split("."):
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        elif isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        else:
            return _ABSENT
    return tree


def _same(documented, composed) -> bool:
    if isinstance(documented, dict) and isinstance(composed, dict):  # a dict override merges into the node
        return all(k in composed and _same(v, composed[k]) for k, v in documented.items())
    if isinstance(documented, float) and isinstance(composed, (int, float)) and not isinstance(composed, bool):
        return abs(documented - composed) <= 1e-12 * max(1.0, abs(documented))
    return documented == composed


def check_composes(entry: str, overrides: list[str]) -> None:
    """``hydra.compose`` of ``conf/<entry>.yaml`` with ``overrides`` succeeds and carries each one."""
    overrides = _concrete_for_compose(overrides)
    single = _single(overrides)
    try:
        cfg = _compose_cached(entry, tuple(single))
    except Exception as e:
        raise AssertionError(f"hydra.compose('{entry}', {single}) failed:\n{type(e).__name__}: {e}") from None
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    if params:  # a named grid (sweep=...): its first job's overrides must compose too
        grid = _single([f"{k}={v}" for k, v in params.items()])
        try:
            _compose_cached(entry, tuple(single + grid))
        except Exception as e:
            raise AssertionError(f"the first job of the grid in hydra.sweeper.params ({grid}) does not compose with {single}:\n"
                                 f"{type(e).__name__}: {e}") from None
    tree = OmegaConf.to_container(cfg, resolve=False)
    choices = dict(cfg.hydra.runtime.choices)
    wrong = []
    for o in _parsed(single):
        key = o.get_key_element().lstrip("+~")
        group = o.key_or_group + (f"@{o.package}" if o.package else "")
        if o.is_delete():
            if _at(tree, key) is not _ABSENT and key not in choices:
                wrong.append(f"~{key}: still in the composed config")
            continue
        value = o.value()
        if group in choices or o.key_or_group in choices:
            got = choices.get(group, choices.get(o.key_or_group))
            if str(got) != _element(value):
                wrong.append(f"{o.input_line}: the composed choice of {group} is {got!r}")
            continue
        got = _at(tree, key)
        if got is _ABSENT:
            wrong.append(f"{o.input_line}: {key} is not in the composed config")
        elif not (isinstance(value, str) and "${" in value) and not _same(_plain(value), got):
            wrong.append(f"{o.input_line}: composed {key} = {got!r}")
    assert not wrong, f"hydra.compose('{entry}', ...) did not carry the documented overrides:\n  " + "\n  ".join(wrong)


def _plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- classifying whole commands

def segments(cmd: Command) -> list[Segment]:
    if cmd.mark not in (None, "run", "compose", "static"):
        return [Segment("unknown", "", [], {}, text=cmd.text, why=f"the block's mark <!-- test: {cmd.mark} --> is none of run, compose, static")]
    segs = [parse_segment(p) for p in _split_chain(cmd.text)] if not re.match(r"^(for|while|until)\b", cmd.text) else [parse_segment(cmd.text)]
    if cmd.mark:
        for s in segs:
            if cmd.mark == "compose" and s.what.startswith("hydra:"):
                s.kind, s.why = "compose", "<!-- test: compose -->"
            elif cmd.mark == "static" and s.kind != "unknown":
                s.kind, s.why = "static", "<!-- test: static -->"
            elif cmd.mark == "run" and s.kind == "compose":
                s.kind = "run"
    return segs


@functools.cache
def _classes(text: str, mark: str | None) -> tuple[str, ...]:
    return tuple(s.kind for s in segments(Command("", 0, text, mark)))


def command_class(cmd: Command) -> str:
    kinds = _classes(cmd.text, cmd.mark)
    if "unknown" in kinds:
        return "unknown"
    if "run" in kinds:
        return "run"
    return "compose" if "compose" in kinds else "static"


COMMANDS = all_commands()


def _params(classes: set[str]):
    out = []
    for c in COMMANDS:
        kind = command_class(c)
        if kind in classes:
            out.append(pytest.param(c, id=c.id, marks=[pytest.mark.slow] if kind == "run" else []))
    return out


def _explain_unknown(cmd: Command) -> str:
    whys = [f"{s.text!r}: {s.why}" for s in segments(cmd) if s.kind == "unknown"]
    return f"{cmd.id}: no rule of tests/test_documented_commands.py knows how to test {cmd.text!r} ({'; '.join(whys)}); {HOW_TO_MARK}"


# ---------------------------------------------------------------- the tests: default suite

def test_the_docs_have_commands():
    assert len(COMMANDS) >= 20, [c.id for c in COMMANDS]
    assert any(command_class(c) == "run" for c in COMMANDS)


@pytest.mark.parametrize("cmd", _params({"unknown"}) or [pytest.param(None, id="none")])
def test_every_command_is_classified(cmd):
    if cmd is not None:
        pytest.fail(_explain_unknown(cmd))


@pytest.mark.parametrize("cmd", _params({"compose", "static"}))
def test_documented_command(cmd):
    for seg in segments(cmd):
        check_segment(seg, cmd)


@pytest.mark.parametrize("cmd", [pytest.param(p.values[0], id=p.id) for p in _params({"run"})
                                 if any(s.what.startswith("hydra:") for s in segments(p.values[0]))])
def test_run_command_composes(cmd):
    """The fast half of a RUN command: its Hydra overrides compose (the slow suite runs it)."""
    for seg in segments(cmd):
        if seg.what.startswith("hydra:"):
            check_composes(seg.what.split(":", 1)[1], seg.args)


def check_segment(seg: Segment, cmd: Command) -> None:
    if seg.kind == "compose":
        if seg.what.startswith("hydra:"):
            check_composes(seg.what.split(":", 1)[1], seg.args)
        else:  # an argparse entry with hub weights: its arguments parse
            _check_argparse(seg)
    elif seg.kind == "static":
        check_static(seg, cmd)
    elif seg.kind == "run":  # in a compose/static command: a part that runs (e.g. `cd x && ...`)
        if seg.what.startswith("hydra:"):
            check_composes(seg.what.split(":", 1)[1], seg.args)
    else:
        pytest.fail(_explain_unknown(cmd))


def _check_argparse(seg: Segment) -> None:
    name = seg.what.split(":", 1)[1]
    proc = subprocess.run([sys.executable, "-m", f"diffusion_lab.{name}", *_first_words(seg.args), "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=_env(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]


def _first_words(args: list[str]) -> list[str]:
    return [a for a in args[:1] if not a.startswith("-") and "/" not in a]


def check_static(seg: Segment, cmd: Command) -> None:
    what, args = seg.what, seg.args
    if what == "pip":
        pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
        extras = set(pyproject["project"].get("optional-dependencies", {}))
        for a in args:
            m = re.fullmatch(r"(?:\.|diffusion[_-]lab|-e\s*\.?)\[([\w,\s-]+)\]", a.strip("'\""))
            if m:
                named = {e.strip() for e in m.group(1).split(",")}
                assert named <= extras, f"{cmd.id}: pip extras {sorted(named - extras)} are not in pyproject.toml ({sorted(extras)})"
    elif what == "make":
        targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", (REPO / "Makefile").read_text(), re.M))
        for t in [a for a in args if not a.startswith("-") and "=" not in a]:
            assert t in targets, f"{cmd.id}: make target {t!r} is not in the Makefile ({sorted(targets)})"
    elif what == "mkdocs":
        assert (REPO / "mkdocs.yml").is_file(), f"{cmd.id}: `mkdocs {' '.join(args)}` documented, but there is no mkdocs.yml"
    elif what == "installed":
        assert shutil.which(args[0], path=str(Path(sys.executable).parent)) or shutil.which(args[0]), f"{cmd.id}: {args[0]} is not installed"
    elif what == "python-c":
        compile(args[0], f"{cmd.id}", "exec")
    elif what == "pytest":
        for a in [a for a in args if not a.startswith("-") and not re.fullmatch(r"[\w\s]+", a)]:
            assert (REPO / a.split("::")[0]).exists(), f"{cmd.id}: {a} does not exist"
    elif what == "cd":
        pass  # a folder of the checkout or the clone: checked by what follows
    elif what in ("export", "assign", "git", "env"):
        pass  # environment: nothing in this repository to check
    elif what.startswith("hydra:"):
        check_composes(what.split(":", 1)[1], args)
    elif what.startswith("script:"):
        assert (REPO / what.split(":", 1)[1]).is_file(), f"{cmd.id}: {what} does not exist"
    else:
        pytest.fail(_explain_unknown(cmd))


# ---------------------------------------------------------------- running (slow)

def _env(cwd: Path) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1",
                PROJECT_ROOT=str(cwd), PYTHONPATH=str(REPO), PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))


def _normal(text: str) -> str:
    """A command's words with the interpreter dropped (``.venv/bin/python`` = ``python`` = ``dl-``)."""
    tokens = shlex.split(_strip_comment(text).replace("<", "\x00").replace(">", "\x01"))
    found = _entry_of(tokens)
    return " ".join([found[0], *found[1]]) if found else " ".join(tokens)


class Store:
    """What documented commands make for others, each made once per session in a folder of its own."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, Path] = {}  # normalized command -> its project root
        self.run_dirs: dict[str, Path] = {}

    def artefact(self, rel: str) -> Path:
        producer = PRODUCERS.get(rel)
        if producer is None:
            m = TINY_PIPELINE.fullmatch(rel)
            assert m, f"nothing documented makes {rel}"
            producer = f"python -m diffusion_lab.tiny_sd {rel}" + ("" if m.group(1) == "sd" else f" --kind {m.group(1)}")
        root = self.produce(producer)
        assert (root / rel).exists(), f"{producer!r} (shrunk) did not make {rel}"
        return root / rel

    def run_dir(self, producer: str) -> Path:
        self.produce(producer)
        return self.run_dirs[_normal(producer)]

    def produce(self, text: str) -> Path:
        key = _normal(text)
        if key not in self.done:
            ws = Path(tempfile.mkdtemp(prefix="made_", dir=self.root))
            run_command(Command("store", 0, text, None), ws, self)
            self.done[key] = ws
        return self.done[key]


@pytest.fixture(scope="session")
def doc_store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("documented"))


@pytest.mark.parametrize("cmd", _params({"run"}))
def test_documented_command_runs(cmd, tmp_path, doc_store):
    run_command(cmd, tmp_path, doc_store)


def run_command(cmd: Command, ws: Path, store: Store) -> None:
    """Every part of ``cmd`` in ``ws`` (its project root): RUN parts run shrunk, the rest are checked."""
    for k, seg in enumerate(segments(cmd)):
        if seg.kind != "run":
            check_segment(seg, cmd)
            continue
        _run_segment(seg, cmd, ws, store, k)


def _resolve_placeholders(text: str, cmd: Command, ws: Path, store: Store) -> str:
    """``<demo run>``, ``<run>``, ``outputs/<task>/runs/<date>`` ... -> the folders that stand for them."""
    def run_for(name: str, rest: str) -> str:
        if name == "demo run":
            return DEMO
        if name == "sd run":
            return SD_FULL
        entry = _entry_of(shlex.split(_placeholders_to_dummy(text)))
        is_train = entry and entry[0] == "hydra:train"
        if rest.startswith("/lora"):
            if is_train:
                exp = re.search(r"\bexperiment=(\S+)", text)
                return f"python -m diffusion_lab.train experiment={exp.group(1) if exp else 'sd_finetune_tiny'} adapter=lora"
            return SD_LORA
        for earlier in reversed(cmd.earlier):
            for part in _split_chain(earlier):
                seg = parse_segment(part)
                if seg.what == "hydra:train" and seg.kind == "run" and not seg.multirun:
                    return part
        textual = re.search(r"\b(prompt|prompts_file|negative_prompt|lora)=", text) or (entry and entry[0] == "argparse:lora")
        return SD_FULL if textual else DEMO

    def sub_run(m: re.Match) -> str:
        return str(store.run_dir(f"python -m diffusion_lab.train experiment={m.group(1)}"))

    text = re.sub(r"outputs/(\w+)/runs/<[^<>]+>", sub_run, text)

    def sub(m: re.Match) -> str:
        name, rest = m.group(1), text[m.end():]
        how = PLACEHOLDERS.get(name)
        if how is None:
            pytest.fail(f"{cmd.id}: no documented command makes <{name}>; {HOW_TO_MARK}")
        if how[0] == "artefact":
            return str(store.artefact(how[1]))
        if how[0] == "images":
            return str(_image_folder(ws / f"images_{name.replace(' ', '_')}"))
        return str(store.run_dir(run_for(name, rest)))

    return re.sub(r"<([^<>]+)>", sub, text)


def _image_folder(folder: Path, n: int = 16) -> Path:
    """``n`` scikit-learn digits as 16 px RGB PNGs with a caption each (metadata.jsonl)."""
    import json

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    digits = load_digits()
    rows = []
    for i in range(n):
        img = (digits.images[i] / 16 * 255).astype(np.uint8)
        Image.fromarray(img).resize((16, 16)).convert("RGB").save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a handwritten digit {digits.target[i]}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _provide_inputs(text: str, ws: Path, store: Store, own_outputs: set[str]) -> None:
    """Link into ``ws`` what the command reads from ``outputs/...`` (made by the store) and make the
    files that stand for the user's own (``prompts.txt``, ``my_images``, ...)."""
    for rel in sorted(set(re.findall(r"(?<![\w/])(outputs/[\w.-]+(?:/[\w.-]+)?)", text))):
        key = next((k for k in PRODUCERS if rel == k or rel.startswith(k + "/")), None)
        if key is None and TINY_PIPELINE.fullmatch(rel.split("/")[0] + "/" + rel.split("/")[1]):
            key = "/".join(rel.split("/")[:2])
        if key is None or key in own_outputs or (ws / key).exists():
            continue
        _link(store.artefact(key), ws / key)
    for name, how in USER_FILES.items():
        if re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w/.-])", text) and not (ws / name).exists():
            if how == "prompts":
                (ws / name).write_text("a handwritten digit one\na handwritten digit two\n")
            elif how == "images":
                _image_folder(ws / name)
            elif how == "lora_file":
                shutil.copy(store.run_dir(SD_LORA) / "lora" / "lora_kohya.safetensors", ws / name)


def _link(target: Path, where: Path) -> None:
    where.parent.mkdir(parents=True, exist_ok=True)
    where.symlink_to(target, target_is_directory=target.is_dir())


def _outputs_of(seg: Segment, text: str) -> set[str]:
    """The ``outputs/...`` keys this command writes itself (so it needs no store copy of them)."""
    own = {k for k, v in PRODUCERS.items() if _normal(v) == _normal(text)}
    if seg.what == "argparse:tiny_sd" and seg.args:
        own.add(seg.args[0])
    if seg.what.startswith("script:") and "--out" in seg.args:
        own.add(seg.args[seg.args.index("--out") + 1])
    return own


def _config_inputs(seg: Segment, ws: Path) -> set[str]:
    """``outputs/...`` folders the composed train config reads (``model.pretrained`` of a tiny experiment,
    ``<stack_dir>/vae`` of experiment=ldm_digits), not counting what it writes (its export, its run dir)."""
    entry = seg.what.split(":", 1)[1]
    cfg = copy.deepcopy(compose_entry(entry, [*seg.args, f"paths.root_dir={ws}"]))
    OmegaConf.set_readonly(cfg, False)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir if entry != "train" else str(ws / "run")
    writes = set()
    for key in ("callbacks.export.dirpath", "paths.output_dir"):
        try:
            v = OmegaConf.select(cfg, key)
            if isinstance(v, str):
                writes.add(v)
        except Exception:  # noqa: BLE001
            pass
    found = set()
    for path, _ in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        try:
            v = OmegaConf.select(cfg, ".".join(map(str, path)))
        except Exception:  # noqa: BLE001
            continue
        if isinstance(v, str) and v.startswith(str(ws / "outputs") + "/") and not any(v == w or v.startswith(w + "/") for w in writes):
            rel = Path(v).relative_to(ws).as_posix()
            key = next((k for k in PRODUCERS if rel == k or rel.startswith(k + "/")), None)
            if key is None and TINY_PIPELINE.match(rel):
                key = "/".join(rel.split("/")[:2])
            if key:
                found.add(key)
    return found


def _shrunk(entry: str, overrides: list[str], cfg: DictConfig) -> list[str]:
    """``overrides`` with SHRINK[entry] merged in (a SHRINK key replaces the documented value), for the keys
    the composed config has."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    extra = list(SHRINK.get(entry, []))
    if entry == "train" and any(o.startswith("callbacks.posthoc_ema.every_n_steps=") for o in overrides):
        extra = [e for e in extra if not e.startswith("trainer.max_steps")] + ["trainer.max_steps=4", "callbacks.posthoc_ema.every_n_steps=1"]
    if entry == "train" and any(o.startswith("ckpt_path=") for o in overrides):  # a resume: train past the checkpoint's step 2
        extra = [e for e in extra if not e.startswith("trainer.max_steps")] + ["trainer.max_steps=4"]
    if entry == "posthoc_ema" and any(o.startswith("step=") for o in overrides):
        extra.append("step=2")  # an earlier snapshot of the shrunk run
    merged = {o.split("=", 1)[0]: o for o in overrides}
    for e in extra:
        key = e.split("=", 1)[0]
        if _at(tree, key) is not _ABSENT:
            merged[key] = e
    return list(merged.values())


def _run_segment(seg: Segment, cmd: Command, ws: Path, store: Store, index: int) -> None:
    documented = seg.text
    text = _resolve_placeholders(seg.text, cmd, ws, store)
    seg = parse_segment(text)
    assert seg.kind == "run", (text, seg.why)
    _provide_inputs(text, ws, store, _outputs_of(seg, text))
    env = {**_env(ws), **seg.env}
    env["OMP_NUM_THREADS"] = "1"
    if seg.what.startswith("hydra:"):
        entry = seg.what.split(":", 1)[1]
        for key in _config_inputs(seg, ws) if entry == "train" else ():
            if not (ws / key).exists():
                _link(store.artefact(key), ws / key)
        cfg = compose_entry(entry, seg.args)
        args = _shrunk(entry, seg.args, cfg)
        run_dir = ws / f"run_{index}"
        if seg.multirun or "MULTIRUN" in str(cfg.hydra.mode):
            args = ["-m", *args, f"hydra.sweep.dir={ws / f'multirun_{index}'}"] if seg.multirun else [*args, f"hydra.sweep.dir={ws / f'multirun_{index}'}"]
        elif not any(a.startswith(("paths.output_dir=", "hydra.run.dir=")) for a in args):
            args.append(f"paths.output_dir={run_dir}")
        own = [a for a in args if a.startswith(f"hydra.searchpath=[file://{_scratch()}")]  # --config-dir, as documented
        args = [a for a in args if a not in own] + [x for a in own for x in ("--config-dir", a.split("file://", 1)[1].rstrip("]"))]
        argv = [sys.executable, "-m", f"diffusion_lab.{entry}", *args]
    elif seg.what.startswith("argparse:"):
        argv = [sys.executable, "-m", f"diffusion_lab.{seg.what.split(':', 1)[1]}", *seg.args]
    else:  # script:experiments/...
        script = seg.what.split(":", 1)[1]
        shrink = SCRIPT_SHRINK.get(script)
        args = list(seg.args)
        if shrink is None:
            args = ["--help"]
        else:
            for flag, value in shrink.items():
                if value == "<its default samplers at 2 steps>":  # the samplers it compares (given or its own), each in 2 steps
                    from experiments.lib.samplers import DEFAULT_SETTINGS

                    names = [s.split(":")[0] for s in args[args.index(flag) + 1].split(",")] if flag in args else [n for n, _ in DEFAULT_SETTINGS]
                    value = ",".join(dict.fromkeys(f"{name}:2" for name in names))
                if flag in args:
                    args[args.index(flag) + 1] = value
                else:
                    args += [flag, value]
        argv = [sys.executable, str(REPO / script), *args]
    proc = subprocess.run(argv, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    (ws / f"cmd_{index}.log").write_text(" ".join(map(shlex.quote, argv)) + "\n" + proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{cmd.id}: {' '.join(map(shlex.quote, argv))} failed (rc {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    for key in _outputs_of(seg, text) if (ws / "outputs").is_dir() else ():  # what it made, for later commands
        producer = PRODUCERS.get(key) or (TINY_PIPELINE.fullmatch(key) and f"python -m diffusion_lab.tiny_sd {key}"
                                          + ("" if key == "outputs/tiny_sd" else f" --kind {key.split('tiny_', 1)[1]}"))
        if producer and (ws / key).exists() and _normal(producer) == _normal(documented):
            store.done.setdefault(_normal(producer), ws)
    if seg.what == "hydra:train" and not seg.multirun:  # later commands may read this run (<run>, <demo run>)
        store.run_dirs.setdefault(_normal(documented), run_dir)
        store.done.setdefault(_normal(documented), ws)


# ---------------------------------------------------------------- the harness itself

def test_the_harness_parses_blocks_marks_prompts_and_continuations(tmp_path, monkeypatch):
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text("\n".join([
        "```console", "$ python -m diffusion_lab.noising  # a comment", "some output", "```",
        "<!-- test: compose -->", "", "```bash", "# only a comment",
        "python -m diffusion_lab.train \\", "    trainer.max_steps=3", "pip install -e '.[nope]'", "```",
        "```python", "print('not shell')", "```",
    ]))
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = commands_in(doc)
    assert [(c.id, c.text, c.mark) for c in found] == [
        ("docs/x.md:2", "python -m diffusion_lab.noising", None),
        ("docs/x.md:9", "python -m diffusion_lab.train trainer.max_steps=3", "compose"),
        ("docs/x.md:11", "pip install -e '.[nope]'", "compose"),
    ]
    assert command_class(found[0]) == "run" and command_class(found[1]) == "compose"


def test_the_harness_fails_what_is_wrong():
    with pytest.raises(AssertionError, match="trainer.max_stepz"):
        check_composes("train", ["trainer.max_stepz=3"])
    assert not _same(1e-4, 3e-4) and _same({"a": 1}, {"a": 1, "b": 2}) and not _same({"a": 1}, {"a": 2})
    with pytest.raises(AssertionError, match="nope"):
        check_static(parse_segment("pip install -e '.[dev,nope]'"), Command("x.md", 1, "", None))
    with pytest.raises(AssertionError, match="not in the Makefile"):
        check_static(parse_segment("make dmeo"), Command("x.md", 1, "", None))
    assert command_class(Command("x.md", 1, "frobnicate --all", None)) == "unknown"
    assert command_class(Command("x.md", 1, "python -m diffusion_lab.noising", "skip")) == "unknown"  # no skip mark
    assert "<!-- test: compose -->" in _explain_unknown(Command("x.md", 1, "frobnicate --all", None))
