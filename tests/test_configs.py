"""Every option of every config group under conf/ is composed, in a context where it makes sense,
and what its file sets is what the composed config holds; every experiment instantiates a model
of the shape its config implies.

Groups are discovered by walking conf/: a new group folder that no context below composes fails
``test_every_group_is_covered``; a new option of a known group is composed automatically.
Folders named ``_shared`` hold partial configs pulled in by options' defaults lists (not options).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tests.conftest import CONF_DIR, TINY, compose_cfg

CONF = Path(CONF_DIR)


# ---------------------------------------------------------------- discovery

def _is_partial(path: Path) -> bool:
    return any(part.startswith("_") for part in path.relative_to(CONF).parts)


def _groups() -> list[str]:
    """Every folder under conf/ holding option files (``backbone``, ``hydra/launcher``, ...)."""
    dirs = {p.parent for p in CONF.rglob("*.yaml") if p.parent != CONF and not _is_partial(p.parent)}
    return sorted(d.relative_to(CONF).as_posix() for d in dirs)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _partials() -> list[str]:
    return sorted(p.relative_to(CONF).with_suffix("").as_posix() for p in CONF.rglob("*.yaml") if _is_partial(p.parent))


EXPERIMENTS = _options("experiment")
FAMILIES = _options("model")  # pixel_ddpm, latent_sd, latent_sdxl, autoencoder
LATENT = ["model=latent_sd"]
NEEDS_ROOT = {"image_folder": ["data.root=/nonexistent"],  # data=image_folder has no default folder
              "shards": ["data.root=/nonexistent"],  # nor data=shards (a prepared shard set)
              "preference": ["data.root=/nonexistent"],  # nor data=preference (a folder of pairs)
              "dreambooth": ["data.instance_dir=/nonexistent", "data.instance_prompt=a sks dog", "data.class_prompt=a dog"]}


# ---------------------------------------------------------------- composing

@functools.cache
def _compose(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    """The composed config with Hydra's own node (sweeps, launcher, hydra=...), as ``@hydra.main``
    would see it. Cached: tests must not modify it."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _resolved(cfg: DictConfig, key: str):
    """``key`` resolved, with the run folder set (``${hydra:runtime.output_dir}`` has no run here)."""
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_readonly(cfg, False)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.paths.log_dir = "/run"
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _file_values(path: str) -> tuple[str | None, dict]:
    """(``# @package`` header or None, the file's own keys without ``defaults``), unresolved."""
    file = CONF / f"{path}.yaml"
    header = next((line.split("@package", 1)[1].strip() for line in file.read_text().splitlines() if line.startswith("# @package")), None)
    values = OmegaConf.to_container(OmegaConf.load(file), resolve=False) or {}
    values.pop("defaults", None)
    return header, values


def _leaves(tree, prefix: tuple = ()):
    """(path, value) for every value in a nested dict; lists and empty dicts are values."""
    if isinstance(tree, dict) and tree:
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    elif prefix:
        yield prefix, tree


_ABSENT = object()


def _at(tree, path: tuple):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return _ABSENT
        tree = tree[k]
    return tree


def _package(group: str, option: str, selector: str) -> tuple:
    """Where an option's keys land: its ``# @package`` header, else ``group@package``, else the group."""
    header, _ = _file_values(f"{group}/{option}")
    package = header if header is not None else selector.split("@", 1)[1] if "@" in selector else group.replace("/", ".")
    return () if package == "_global_" else tuple(package.split("."))


def assert_lands(cfg: DictConfig, path: str, package: tuple, skip: set[tuple] = frozenset()) -> int:
    """Every value the file at ``path`` sets is the composed config's value at ``package``
    (except ``skip``: keys a later config in this context sets on purpose). Returns the count."""
    _, values = _file_values(path)
    tree = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    wrong, n = [], 0
    for key, value in _leaves(values):
        if key in skip:
            continue
        got = _at(tree, package + key)
        n += 1
        if got != value:
            wrong.append(f"{'.'.join(map(str, package + key))}: file {value!r}, composed {'(absent)' if got is _ABSENT else repr(got)}")
    assert not wrong, f"{path}.yaml's values did not land:\n  " + "\n  ".join(wrong)
    return n


# ---------------------------------------------------------------- where each group makes sense

SELECTOR = {  # override key of a group (plain group name unless listed)
    "optimizer": "optimizer@model.optimizer",
    "lr_scheduler": "lr_scheduler@model.lr_scheduler",
}


def _unet_context(option: str) -> list[tuple[str, list[str]]]:
    _, values = _file_values(f"backbone/{option}")
    if option.startswith("dit_"):  # class-conditional DiTs (components/backbones.py): pixel, or on a VAE's latents
        return [("train", ["conditioning=class_labels", *(["vae=tiny", "data=digits_captioned"] if "latent" in option else [])])]
    pixel = values.get("_target_") == "diffusers.UNet2DModel"
    return [("train", [] if pixel else [*LATENT, "text_encoder=vocab"])]  # ldm_digits reads the encoder's width


def _sampler_context(option: str) -> list[tuple[str, list[str]]]:
    _, values = _file_values(f"sampler/{option}")
    kinds = list(values["classes"])  # the processes it runs for: the default vp if it can, else its own
    return [("train", [] if "vp" in kinds else [f"process={kinds[0]}"])]


# group -> option -> [(entry config, overrides besides the option)]
CONTEXTS = {
    "adapter": lambda o: [("train", LATENT + (["adapter.initializer_token=dog"] if o == "textual_inversion" else []))],  # ??? by design
    "callbacks": lambda o: [("train", ["model=autoencoder"] if o == "autoencoder" else [])],
    "conditioning": lambda o: [("train", ["backbone.num_class_embeds=10"] if o == "class_labels" else [])],
    "controlnet": lambda o: [("train", LATENT)],
    "method": lambda o: [("train", _needs_reward(o)), ("train", LATENT + _needs_reward(o))],  # pixel and latent models
    "reward": lambda o: [("train", ["method=grpo"])],  # read by method=grpo
    "data": lambda o: [("train", NEEDS_ROOT.get(o, []))],
    "debug": lambda o: [("train", [])],
    "experiment": lambda o: [("train", [])],
    "features": lambda o: [("evaluate", [])],
    "hparams_search": lambda o: [("train", [])],
    "hydra": lambda o: [("train", [])],
    "hydra/launcher": lambda o: [("train", ["trainer=ddp_multinode"])],
    "logger": lambda o: [("train", [])],
    "lr_scheduler": lambda o: [("train", [f"model={m}"]) for m in FAMILIES if m == "pixel_ddpm" or _file_values(f"model/{m}")[1].get("lr_scheduler")],
    "model": lambda o: [("train", [])],
    "backbone": _unet_context,
    "optimizer": lambda o: [("train", [f"model={m}"]) for m in FAMILIES],
    "paths": lambda o: [("train", [])],
    "plan/architecture": lambda o: [("plan", [])],
    "process": lambda o: [("train", LATENT if o == "vp_pretrained" else [])],
    "quantization": lambda o: [("train", LATENT)],
    "recipe": lambda o: [("sample", [])],
    "sampler": _sampler_context,
    "sweep": lambda o: [("train", [])],
    "text_encoder": lambda o: [("train", ["model=latent_sdxl"] if o == "sdxl_pretrained" else LATENT)],
    "trainer": lambda o: [("train", [])],
    "vae": lambda o: [("train", [] if o == "identity" else LATENT)],
}


def _family_block(cfg: DictConfig, block: str, name: str | None = None) -> dict:
    """What the composed model family's own file sets under ``model.<block>``, after what the model files it
    builds on set (its defaults entries in conf/model/: ``_shared/latent``, ``latent_sd``, ...)."""
    name = name or cfg.hydra.runtime.choices.model
    merged = OmegaConf.create({})
    for entry in OmegaConf.load(CONF / f"model/{name}.yaml").get("defaults", []):
        base = str(entry).split("@", 1)[0]
        if isinstance(entry, str) and (CONF / f"model/{base}.yaml").is_file():
            merged = OmegaConf.merge(merged, _family_block(cfg, block, base))
    return OmegaConf.to_container(OmegaConf.merge(merged, _file_values(f"model/{name}")[1].get(block) or {}), resolve=False)


def _skip(cfg: DictConfig, group: str, package: tuple, overrides: list[str]) -> set[tuple]:
    """Keys the context sets on purpose after the option: its ``key=value`` overrides
    (``data.root=...``) and the model family's own optimizer/LR values."""
    keys = {tuple(o.split("=", 1)[0].split(".")) for o in overrides if "/" not in o.split("=", 1)[0] and "@" not in o}
    skip = {k[len(package):] for k in keys if k[: len(package)] == package}
    if group in ("optimizer", "lr_scheduler"):
        skip |= {k for k, _ in _leaves(_family_block(cfg, group))}
    return skip


# ---------------------------------------------------------------- what a user checks, per group

def _check_optimizer(cfg, option, overrides):
    assert cfg.model.optimizer._target_ == _file_values(f"optimizer/{option}")[1]["_target_"] and cfg.model.optimizer._partial_ is True
    for key, value in _leaves(_family_block(cfg, "optimizer")):  # the family's lr survives the swap
        assert _at(OmegaConf.to_container(cfg.model.optimizer), key) == value, (option, key)


def _check_lr_scheduler(cfg, option, overrides):
    assert cfg.model.lr_scheduler.name == _file_values(f"lr_scheduler/{option}")[1]["name"] == option
    for key, value in _leaves(_family_block(cfg, "lr_scheduler")):
        assert _at(OmegaConf.to_container(cfg.model.lr_scheduler), key) == value, (option, key)


def _check_sampler(cfg, option, overrides):
    assert cfg.sampler.name == option and cfg.model.sampler.name == option  # the model samples with it


def _check_process(cfg, option, overrides):
    assert cfg.model.process._target_ == cfg.process._target_  # the model trains with it
    assert cfg.process.scheduler._target_


def _check_vae(cfg, option, overrides):
    assert cfg.model.codec._target_ == cfg.vae._target_


def _check_text_encoder(cfg, option, overrides):
    assert cfg.model.conditioner._target_ == cfg.text_encoder._target_
    if option == "vocab":
        assert _resolved(cfg, "text_encoder.tokenizer.words.templates") == [cfg.data.caption_template]


def _check_conditioning(cfg, option, overrides):
    assert cfg.model.conditioner._target_ == cfg.conditioning._target_
    if option == "class_labels":
        assert _resolved(cfg, "conditioning.num_classes") == 10


def _needs_reward(method: str) -> list[str]:
    return ["reward=digit_classifier"] if method == "grpo" else []


def _check_reward(cfg, option, overrides):
    """method=grpo receives the chosen reward."""
    assert _resolved(cfg, "model.method")["reward"]["_target_"] == cfg.reward._target_


def _check_method(cfg, option, overrides):
    """The model receives the method's part: nothing for supervised, a ``Method`` whose ``name`` is the option."""
    from hydra.utils import instantiate

    from diffusion_lab.methods import Method

    part = _resolved(cfg, "model.method")
    if option == "supervised":
        assert part is None
    else:
        method = instantiate(part)
        assert isinstance(method, Method) and method.name == option


def _check_adapter(cfg, option, overrides):
    lora = _resolved(cfg, "model.backbone_lora")
    if option == "none":
        assert lora is None and _resolved(cfg, "model.text_lora") is None
    elif option == "textual_inversion":  # no LoRA: new token embeddings train (model.text_embedding)
        assert lora is None and _resolved(cfg, "model.text_embedding")["placeholder_token"] == cfg.adapter.placeholder_token
    else:
        assert lora["rank"] == cfg.adapter.rank and lora["target_modules"] == list(cfg.adapter.target_modules)
    assert _resolved(cfg, "callbacks.export.dirpath") == f"/run/{cfg.adapter.export_name}"  # <run>/lora or <run>/pipeline


def _check_data(cfg, option, overrides):
    dm = _resolved(cfg, "data.datamodule")
    shards = dm["_target_"] == "diffusion_lab.data.shards.ShardDataModule"  # streams prepared shards: no dataset, split fixed by prepare
    assert shards or (dm["_target_"] == "diffusion_lab.data.DiffusionDataModule" and dm["dataset"]["_target_"])
    for key in ("batch_size", "num_workers", "pin_memory", "persistent_workers", *(("resolution", "channels") if shards else ("val_fraction",))):
        assert dm[key] == cfg.data[key], key  # the knobs reach the datamodule
    unet = _resolved(cfg, "model.backbone")
    assert unet["sample_size"] == cfg.data.resolution and unet["in_channels"] == unet["out_channels"] == cfg.data.channels


def _check_model(cfg, option, overrides):
    assert cfg.model.optimizer._partial_ and cfg.model.lr_scheduler._partial_  # the module binds parameters
    if "resolution" in cfg.model:
        assert _resolved(cfg, "model.resolution") == cfg.data.resolution


def _check_unet(cfg, option, overrides):
    unet = _resolved(cfg, "model.backbone")
    if "sample_size" in unet:
        assert cfg.data.resolution % unet["sample_size"] == 0  # the data's side, or the latents' side
    if unet["_target_"] == "diffusers.UNet2DModel":  # pixel UNets: the data's channels in and out
        assert unet["in_channels"] == unet["out_channels"] == cfg.data.channels


def _check_trainer(cfg, option, overrides):  # (test_experiment_instantiates builds trainers)
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert _resolved(cfg, "trainer.default_root_dir") == "/run"  # Lightning writes into the run folder
    if "strategy" in cfg.trainer:
        assert cfg.trainer.strategy._target_.startswith(("pytorch_lightning.strategies.", "diffusion_lab.components.fsdp."))


def _check_logger(cfg, option, overrides):
    loggers = OmegaConf.to_container(cfg.logger, resolve=False) if cfg.get("logger") else {}
    assert all(v["_target_"] for v in loggers.values()) and (option != "none" or not loggers)


def _check_callbacks(cfg, option, overrides):
    callbacks = OmegaConf.to_container(cfg.callbacks, resolve=False)
    assert callbacks and all(v is None or v["_target_"] for v in callbacks.values())


def _check_sweep(cfg, option, overrides):
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    for key in cfg.hydra.sweeper.params:  # every swept key exists in the config it sweeps
        assert OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT, f"{option} sweeps {key}, which is not a config key"


def _check_launcher(cfg, option, overrides):
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert _resolved(cfg, "hydra.launcher.nodes") == cfg.trainer.num_nodes


CHECKS = {
    "optimizer": _check_optimizer,
    "lr_scheduler": _check_lr_scheduler,
    "sampler": _check_sampler,
    "process": _check_process,
    "vae": _check_vae,
    "text_encoder": _check_text_encoder,
    "conditioning": _check_conditioning,
    "adapter": _check_adapter,
    "method": _check_method,
    "reward": _check_reward,
    "data": _check_data,
    "model": _check_model,
    "backbone": _check_unet,
    "trainer": _check_trainer,
    "logger": _check_logger,
    "callbacks": _check_callbacks,
    "sweep": _check_sweep,
    "hparams_search": _check_sweep,
    "hydra/launcher": _check_launcher,
}


def _cases():
    for group in _groups():
        for option in _options(group):
            for config_name, overrides in CONTEXTS.get(group, lambda o: [])(option):
                selector = SELECTOR.get(group, group)
                tag = " ".join(overrides)
                yield pytest.param(group, option, config_name, overrides, id=f"{config_name}:{selector}={option}" + (f"[{tag}]" if tag else ""))


# ---------------------------------------------------------------- the tests

def test_every_group_is_covered():
    """A group folder no context composes fails here: add it to CONTEXTS (and CHECKS)."""
    groups = _groups()
    assert {"backbone", "hydra/launcher", "optimizer", "lr_scheduler", "process", "sampler"} <= set(groups)
    assert not set(groups) - set(CONTEXTS), f"config groups no test composes: {sorted(set(groups) - set(CONTEXTS))}"
    assert not set(CONTEXTS) - set(groups), f"CONTEXTS names groups that no longer exist: {sorted(set(CONTEXTS) - set(groups))}"
    assert all(_options(g) for g in groups)


@pytest.mark.parametrize("group,option,config_name,overrides", list(_cases()))
def test_every_option_composes_and_lands(group, option, config_name, overrides):
    selector = SELECTOR.get(group, group)
    choose = (*overrides, f"{selector}={option}")
    if all("." not in o.split("=", 1)[0] for o in overrides):  # group choices only: the option may be their default
        cfg = _compose(config_name, tuple(overrides))  # composed once, shared by every option it defaults to
        cfg = cfg if cfg.hydra.runtime.choices.get(selector) == option else _compose(config_name, choose)
    else:
        cfg = _compose(config_name, choose)
    assert cfg.hydra.runtime.choices[selector] == option
    package = _package(group, option, selector)
    n = assert_lands(cfg, f"{group}/{option}", package, _skip(cfg, group, package, overrides))
    assert n or option == "none", f"{group}/{option}.yaml sets nothing"  # logger=none is empty on purpose
    if group in CHECKS:
        CHECKS[group](cfg, option, overrides)


def _pulls(file: Path, name: str) -> bool:
    """Whether ``file``'s defaults list pulls in ``_shared/<name>``, itself or through another shared partial
    (``model/latent_*.yaml`` -> ``_shared/latent`` -> ``memory``, ``speed``)."""
    for entry in (str(e).split("@", 1)[0] for e in OmegaConf.load(file).get("defaults", [])):
        stem = entry.removeprefix("_shared/")
        if stem == name or (entry.startswith("_shared/") and _pulls(file.parent / "_shared" / f"{stem}.yaml", name)):
            return True
        if file.parent.name == "_shared" and (file.parent / f"{entry}.yaml").is_file() and (entry == name or _pulls(file.parent / f"{entry}.yaml", name)):
            return True
    return False


@pytest.mark.parametrize("partial", _partials())
def test_shared_defaults_land_in_every_option_using_them(partial):
    """conf/<group>/_shared/X.yaml: pulled in by options' defaults lists; its values land unless the option sets its own."""
    group = partial.split("/_shared/")[0]
    users = [o for o in _options(group) if _pulls(CONF / group / f"{o}.yaml", Path(partial).name)]
    assert users, f"{partial}.yaml is pulled in by no option of {group}"
    for option in users:
        cfg = _compose("train", (*NEEDS_ROOT.get(option, []), f"{group}={option}"))
        own = {k for k, _ in _leaves(_file_values(f"{group}/{option}")[1])}
        assert_lands(cfg, partial, tuple(group.replace("/", ".").split(".")), skip=own)


@pytest.mark.parametrize("name", ["train", "sample", "noising", "evaluate"])
def test_entry_configs_compose(name, tmp_path):
    cfg = compose_cfg(name, [], tmp_path)
    assert cfg.task_name == name and cfg.paths.output_dir == str(tmp_path)


# ---- optimizer and LR schedule: the group swaps the class, model.* keys the values

@pytest.mark.parametrize(
    "override,key,value",
    [  # spellings used in README.md, experiments, sweeps and other tests
        ("model.optimizer.lr=3e-4", "model.optimizer.lr", 3e-4),
        ("model.optimizer.fused=true", "model.optimizer.fused", True),
        ("model.optimizer._target_=diffusion_lab.components.optim.adamw_8bit", "model.optimizer._target_", "diffusion_lab.components.optim.adamw_8bit"),
        ("model.lr_scheduler.name=constant_with_warmup", "model.lr_scheduler.name", "constant_with_warmup"),
        ("model.lr_scheduler.num_warmup_steps=50", "model.lr_scheduler.num_warmup_steps", 50),
        ("model.lr_scheduler=null", "model.lr_scheduler", None),
        ("optimizer@model.optimizer=adamw_8bit", "model.optimizer._target_", "diffusion_lab.components.optim.adamw_8bit"),
        ("lr_scheduler@model.lr_scheduler=linear", "model.lr_scheduler.name", "linear"),
    ],
)
def test_documented_optimizer_overrides(override, key, value):
    family = "pixel_ddpm"
    cfg = _compose("train", (f"model={family}", override))
    assert OmegaConf.select(cfg, key) == value
    if "optimizer.lr" not in override:  # any other override keeps the family's learning rate
        assert cfg.model.optimizer.lr == _file_values(f"model/{family}")[1]["optimizer"]["lr"]


def test_the_built_optimizer_has_the_family_values():
    """``model.optimizer`` is what configure_optimizers calls: pixel_ddpm's AdamW is diffusers'
    train_unconditional one; the LR override reaches the param group."""
    cfg = _compose("train", ("model.optimizer.lr=3e-4",))
    opt = instantiate(cfg.model.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (3e-4, (0.95, 0.999), 1e-6, 1e-8)


def test_8bit_adamw_without_bitsandbytes_names_the_fix(monkeypatch):
    from diffusion_lab.utils.errors import ConfigError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it: the import fails
    cfg = _compose("train", ("model=latent_sd", "optimizer@model.optimizer=adamw_8bit"))
    with pytest.raises(ConfigError, match=r"pip install -e '.\[bnb\]'"):
        instantiate(cfg.model.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])


def test_8bit_adamw_builds_and_steps():
    """make install brings bitsandbytes (the quant extra): optimizer@model.optimizer=adamw_8bit is its AdamW8bit, and it updates."""
    cfg = _compose("train", ("model=latent_sd", "optimizer@model.optimizer=adamw_8bit"))
    weight = torch.nn.Parameter(torch.ones(64, 64))
    opt = instantiate(cfg.model.optimizer)(params=[weight])
    assert type(opt).__name__ == "AdamW8bit"
    weight.grad = torch.ones_like(weight)
    opt.step()
    assert (weight < 1).all()


@pytest.mark.parametrize("option", _options("lr_scheduler"))
def test_lr_schedule_option_shapes_the_lr(option):
    """The LR at the first step, after the warmup and at the last step, for each schedule."""
    cfg = _compose("train", (f"lr_scheduler@model.lr_scheduler={option}", "model.lr_scheduler.num_warmup_steps=10"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = instantiate(cfg.model.lr_scheduler)(optimizer=opt, num_training_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = {  # (step 0, step 10 = end of warmup, step 99)
        "constant": (1.0, 1.0, 1.0),
        "constant_with_warmup": (0.0, 1.0, 1.0),
        "cosine": (0.0, 1.0, pytest.approx(0.0003, abs=1e-3)),
        "linear": (0.0, 1.0, pytest.approx(1 / 90, abs=1e-6)),
    }[option]
    assert (lrs[0], lrs[10], lrs[99]) == expected


# ---- runtime behaviour of a few swaps

@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "euler", "heun", "pndm", "unipc"])
def test_sampler_swap_keeps_the_training_schedule(sampler, tmp_path):
    """`sampler=X` changes the sampling class, not the training noise schedule."""
    model = instantiate(compose_cfg("train", [*TINY, f"sampler={sampler}"], tmp_path).model)
    ref = instantiate(compose_cfg("train", [*TINY, "sampler=default"], tmp_path).model)
    assert type(model.sampling_scheduler()).__name__ == model.sampler.classes["vp"].split(".")[-1]
    torch.testing.assert_close(model.process.scheduler.alphas_cumprod, ref.process.scheduler.alphas_cumprod)
    torch.testing.assert_close(model.sampling_scheduler().alphas_cumprod, ref.process.scheduler.alphas_cumprod)


def test_data_resolution_links_into_unet(tmp_path):
    cfg = compose_cfg("train", ["data.resolution=24", "backbone=tiny"], tmp_path)
    assert cfg.model.backbone.sample_size == 24 and cfg.model.backbone.in_channels == cfg.data.channels == 1


# ---- every experiment instantiates, with the shape its config implies

# How to shrink each experiment so it instantiates in seconds; pixel experiments swap the tiny
# UNet, others add their own entry.
SHRINK: dict[str, list[str]] = {
    # the digits latent stack reads earlier stages' exports from stack_dir: tiny ones of the same
    # shapes written there ({digits_stack}), read through the vae each experiment names
    "vae_digits": [],
    "ldm_digits": ["stack_dir={digits_stack}"],
    "ldm_digits_lora": ["stack_dir={digits_stack}", "backbone=ldm_digits", "text_encoder=vocab", "process=vp", "sampler=dpmpp"],
    # SD recipes load every part from model.pretrained: point it at a tiny random SD pipeline
    "sd_finetune": ["model.pretrained={tiny_sd}", "data.resolution=32"],
    "sd_finetune_tiny": ["model.pretrained={tiny_sd}"],
    # SDXL recipes: a tiny random SDXL base pipeline
    "sdxl_finetune_tiny": ["model.pretrained={tiny_sdxl}"],
    "sdxl_lora": ["model.pretrained={tiny_sdxl}", "data.resolution=32"],
    # SD3 / Flux recipes: tiny random SD3 / Flux pipelines
    "sd3_finetune_tiny": ["model.pretrained={tiny_sd3}"],
    "sd3_lora": ["model.pretrained={tiny_sd3}", "data.resolution=32"],
    "flux_finetune_tiny": ["model.pretrained={tiny_flux}"],
    "flux_lora": ["model.pretrained={tiny_flux}", "data.resolution=32"],
    # textual inversion / DreamBooth (tests/test_finetune_methods.py runs them)
    "textual_inversion_tiny": ["model.pretrained={tiny_sd}"],
    "textual_inversion_digits": ["stack_dir={digits_stack}", "backbone=ldm_digits", "text_encoder=vocab", "process=vp", "sampler=dpmpp"],
    "dreambooth_tiny": ["model.pretrained={tiny_sd}"],
    # class-conditional DiTs: a one-block DiT (conditioning=class_labels needs its label table)
    "dit_digits": ["backbone.num_layers=1"],
    "dit_digits_latent": ["backbone.num_layers=1", "stack_dir={digits_stack}"],
    "grpo_digits": ["backbone=tiny", "process=flow_matching"],  # a second stage: its backbone and schedule come from model.pretrained
    "distill_digits": ["backbone=tiny", "process=flow_matching"],  # a second stage, as grpo_digits
    "dpo_digits": ["backbone=tiny", "process=flow_matching"],  # a second stage, as grpo_digits
    **{f"{m}_ldm_digits": ["stack_dir={digits_stack}"] for m in ("distill", "grpo", "dpo")},  # second stages of the digits stack: every part from its pipeline
    "dreambooth_digits": ["stack_dir={digits_stack}", "backbone=ldm_digits", "text_encoder=vocab", "process=vp", "sampler=dpmpp"],
    "dreambooth_sd15": ["model.pretrained={tiny_sd}", "data.resolution=32", "data.instance_dir=/nonexistent",
                        "data.instance_prompt=a sks dog", "data.class_prompt=a dog"],
    # ControlNet recipes (tests/test_controlnet.py runs them): the frozen base from a tiny SD pipeline
    "controlnet_tiny": ["model.pretrained={tiny_sd}"],
    "controlnet_digits": ["model.pretrained={tiny_sd}"],
    "controlnet_sd15": ["model.pretrained={tiny_sd}", "data.resolution=32"],
    # the newer families (diffusion_lab/families/): their tiny pipelines (diffusion_lab/testing/)
    **{f"{k}_finetune_tiny": [f"model.pretrained={{tiny:{k}}}"] for k in ("flux_kontext", "chroma", "flux2", "qwen_image", "qwen_image_edit", "sana", "z_image")},
    **{f"{k}_lora": [f"model.pretrained={{tiny:{k}}}", "data.resolution=32"] for k in ("flux_kontext", "chroma", "flux2", "qwen_image", "qwen_image_edit", "sana", "z_image")},
}


@pytest.fixture(scope="module")
def digits_stack_dir(tmp_path_factory) -> str:
    """A stack_dir as the digits latent stack leaves it: vae/ (experiment=vae_digits: 16 px RGB ->
    8x8x4) and pipeline/ (experiment=ldm_digits), tiny random ones of those shapes."""
    from diffusion_lab.testing import tiny

    stack = tmp_path_factory.mktemp("tiny") / "ldm_digits"
    tiny.tiny_vae(sample_size=16).save_pretrained(stack / "vae")
    tiny.build(stack / "pipeline", resolution=16)
    return str(stack)


def test_experiments_are_checked_with_the_vae_they_name():
    """A ``vae=`` swap here would hide a vae an experiment names that does not compose with it
    (vae=digits under model=pixel_ddpm read model.local_files_only, which that model lacks)."""
    assert {e: o for e, shrink in SHRINK.items() for o in shrink if o.startswith(("vae=", "vae.", "+vae"))} == {}


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory) -> str:
    from diffusion_lab.testing import tiny

    return str(tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_sd"))


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory) -> str:
    from diffusion_lab.testing import tiny

    return str(tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_sdxl", kind="sdxl"))


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory) -> str:
    from diffusion_lab.testing import tiny

    return str(tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_sd3", kind="sd3"))


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> str:
    from diffusion_lab.testing import tiny

    return str(tiny.build(tmp_path_factory.mktemp("tiny") / "tiny_flux", kind="flux"))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """``kind -> folder`` of a newer family's tiny pipeline, built once."""
    from diffusion_lab.testing import tiny

    root, built = tmp_path_factory.mktemp("tiny_families"), {}

    def get(kind: str) -> str:
        if kind not in built:
            built[kind] = str(tiny.build(root / kind, kind=kind))
        return built[kind]

    return get


def _codec_geometry(cfg: DictConfig) -> tuple[int, int]:
    """(latent channels, pixels per latent side) of the first stage, read from the config, or from
    the VAE's own config.json where the config loads a saved VAE. Every AutoencoderKL down block
    but the last halves the image."""
    if cfg.model._target_.endswith("AutoencoderModule"):
        vae = cfg.model.vae
    elif cfg.vae._target_.endswith("IdentityCodec"):
        return cfg.data.channels, 1
    elif "block_out_channels" in cfg.vae.vae:
        vae = cfg.vae.vae
    else:
        folder = Path(cfg.vae.vae.pretrained) / (cfg.vae.vae.subfolder or "")
        vae = json.loads((folder / "config.json").read_text())
    return vae["latent_channels"], 2 ** (len(vae["block_out_channels"]) - 1)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates(experiment, tmp_path, request):
    # GPU experiments are checked on CPU here: same config, accelerator swapped.
    shrink = SHRINK.get(experiment, ["backbone=tiny"]) + ["trainer.accelerator=cpu"]
    for name in ("tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_flux", "digits_stack"):
        if any(f"{{{name}}}" in o for o in shrink):
            shrink = [o.replace(f"{{{name}}}", request.getfixturevalue(f"{name}_dir")) for o in shrink]
    shrink = [re.sub(r"\{tiny:(\w+)\}", lambda m: request.getfixturevalue("tiny_folder")(m.group(1)), o) for o in shrink]
    cfg = compose_cfg("train", [f"experiment={experiment}", *shrink], tmp_path)
    model = instantiate(cfg.model)
    if cfg.model._target_.endswith("AutoencoderModule") or type(model.codec).__name__ in ("VAECodec", "IdentityCodec"):
        channels, factor = _codec_geometry(cfg)
    else:  # a family's own codec (FLUX.2's patchified, Qwen-Image's 5-D, Sana's DC-AE latents): what it reports
        channels, factor = model.codec.latent_channels, model.codec.downsample_factor
    side = cfg.data.resolution // factor
    if cfg.model._target_.endswith("AutoencoderModule"):  # the VAE stage: the latents its encoder really makes
        from diffusion_lab.modules.autoencoder import encode

        with torch.no_grad():
            shape = tuple(encode(model.vae, torch.zeros(2, cfg.data.channels, cfg.data.resolution, cfg.data.resolution), sample=False)[0].shape)
    else:
        shape = model.latent_shape(2)
    assert shape == (2, channels, side, side)
    unet = getattr(model, "backbone", None)
    family = getattr(model, "family", None)
    if unet is not None and (family is None or hasattr(family, "packing")):  # the network takes what the codec makes (Flux: 2x2 packed)
        packed = channels * getattr(family, "packing", 1) ** 2
        assert unet.config.in_channels == (unet.config.get("out_channels") or unet.config.in_channels) == packed
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
    assert trainer.max_steps == cfg.trainer.max_steps
