"""Typed configs (pydantic), loaded from YAML with ``--set key.sub=value`` overrides.

Every section forbids unknown keys, so a typo (``lerning_rate``) fails at load with the key's
dotted path instead of being silently ignored, the nearest valid key of that section when one is close
(``sampler.setps``: "did you mean sampler.steps?"), the file, and ``--set KEY=...`` when the key came
from an override. Every error is one line; an override's value is never repeated (it may be a secret).
Files and ``--set`` values are read by the bounded YAML loader of :mod:`pipeline.untrusted` (1 MiB, 100
aliases, 32 levels, 100,000 values expanded), so an alias bomb is refused before anything walks it.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.data.storage import StorageConfig
from pipeline.data.validate import ImagePolicy
from pipeline.diffusion.unet import UNetConfig, check_channels
from pipeline.posterior.core import Runtime
from pipeline.posterior.sampler import SamplerSettings
from pipeline.settings import pydantic_model
from pipeline.untrusted import ConfigError, YAMLSyntaxError, load_yaml, read_yaml
from pipeline.untrusted import check_run_id as check_run_id  # re-exported, as ConfigError is


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SDEConfig(_Strict):
    """The VP-SDE's noise schedule: beta(t) linear from beta_min to beta_max over t in [eps, 1]."""

    beta_min: float = Field(0.1, gt=0, allow_inf_nan=False, description="beta(0), the schedule's start")
    beta_max: float = Field(20.0, gt=0, allow_inf_nan=False, description="beta(1), the schedule's end")
    eps: float = Field(1e-3, gt=0, lt=1, allow_inf_nan=False, description="the smallest time trained and sampled")

    @model_validator(mode="after")
    def _a_schedule(self) -> SDEConfig:
        from pipeline.diffusion.sde import VPSDE

        VPSDE(self.beta_min, self.beta_max, self.eps)  # the rules in one place: beta_max > beta_min
        return self


class DataConfig(_Strict):
    """The prior's training images."""

    source: str = Field(..., description="embedded dataset name (faces, digits, patches, stripes, "
                                         "natural, text, font-digits, stripes-fine) or a URI of Parquet image "
                                         "shards")
    split: str = Field("train", description="split of an embedded dataset")
    size: int = Field(32, ge=4, description="square size the images are resized to (the prior's size)")
    channels: int = Field(1, description="1 (grey), 3 (RGB) or 4 (RGBA: a text layer)")
    hflip: bool = Field(False, description="random horizontal flips (faces: yes; digits: no)")
    shift: int = Field(0, ge=0, description="random translations by up to this many pixels (edge-replicated)")
    column: str | None = Field(None, description="image column of a shard dataset; default 'image', else "
                                                  "'observation' (what `jointdiff ingest` writes) when the shards "
                                                  "have no 'image' and no 'clean' column")
    grey_to_rgb: Literal["replicate", "random"] = Field(
        "replicate", description="grey images for a 3-channel prior: copied into every channel, or drawn "
                                 "into one random channel per training example (the paper's MNIST prior)")
    patch: int | None = Field(None, ge=4, description="train on random patch x patch crops of images kept at "
                                                      "their own sizes (a shard dataset of mixed sizes, `natural`); "
                                                      "data.size then defaults to it and must equal it")
    limit: int | None = Field(None, ge=1, description="train on the first N images of the split only, and measure "
                                                      "the held-out loss on the first N test images (a quick run)")

    _channels = field_validator("channels")(classmethod(lambda cls, v: check_channels(v)))

    @model_validator(mode="after")
    def _patch_is_size(self) -> DataConfig:
        if self.patch is not None:
            if "size" not in self.model_fields_set:
                self.size = self.patch
            elif self.size != self.patch:
                raise ValueError(f"data.patch={self.patch} and data.size={self.size}: with patches the prior's "
                                 f"size is the patch size; drop data.size or set it to {self.patch}")
        return self


class TrainConfig(_Strict):
    """Denoising score matching with AdamW, a linear warm-up and an EMA of the weights (the model exported)."""

    steps: int = Field(3000, ge=1, description="optimiser steps")
    batch_size: int = Field(64, ge=1, description="images per step")
    lr: float = Field(5e-4, gt=0, description="AdamW learning rate after the warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(200, ge=0, description="steps of linear learning-rate warm-up from 0")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clipped to this")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay of the weights' exponential moving average")
    seed: int = Field(0, description="seed of the data order, noise and initial weights (a resumed run continues "
                                     "its own draws)")
    checkpoint_every: int = Field(500, ge=1, description="steps between resumable states (and the held-out loss)")
    log_every: int = Field(25, ge=1, description="steps between loss reports")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:N")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: the forward and backward pass under "
                                                                  "bfloat16 autocast (weights, EMA, optimiser in fp32)")
    compile: bool = Field(False, description="torch.compile the network (GPUs; slow to start on a CPU)")
    init: str | None = Field(None, description="start from this model's weights (a shipped prior's name, a model "
                                               "folder or a registry's .../latest): fine-tuning; its unet and sde "
                                               "must be this run's. A resumed run continues its own state")


class PriorConfig(_Strict):
    """``jointdiff train``: one diffusion prior."""

    name: str = Field(..., description="the prior's name (its model card; the registry's folder)")
    data: DataConfig
    unet: UNetConfig = Field(default_factory=UNetConfig)
    sde: SDEConfig = Field(default_factory=SDEConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output: str = Field(..., description="folder or URI for training state and the exported model")


class ForwardConfig(_Strict):
    """The forward model: how an observation is made from a clean image and a noise image."""

    name: Literal["blend", "sum", "overlay", "composite"] = Field(
        "blend", description="blend y = (1 - alpha) x + alpha n; sum y = x + n; overlay y = x + alpha n; composite "
                             "y = (1 - alpha m) x + alpha m c, the noise an RGBA layer (colour c, coverage m: the "
                             "text prior) (pipeline/forward.py)")
    alpha: float | Literal["auto"] | None = Field(
        None, description="the model's weight (blend: in (0, 1); overlay: > 0; composite: in (0, 1]); auto: estimated "
                          "per image with x and n (blend only; a row's alpha column is then only the truth its "
                          "error is measured against); default: each row's alpha column, estimated where a blend's "
                          "row has none")
    sigma_y: float = Field(0.0, ge=0, description="Gaussian read-out noise std, [0, 1] units")

    @model_validator(mode="after")
    def _weight(self) -> ForwardConfig:
        from pipeline.forward import FORWARD_MODELS, make_forward

        weight = FORWARD_MODELS[self.name].weight
        if self.alpha == "auto":
            from pipeline.posterior.estimate import ESTIMABLE

            if self.name not in ESTIMABLE:
                raise ValueError(f"forward.alpha=auto: the {self.name} model's weight cannot be estimated (the "
                                 "noise's own amplitude confounds it: docs/how-to/unknown-mixing.md); give a number "
                                 "or an alpha column")
        elif self.alpha is not None:
            if self.alpha <= 0:
                raise ValueError(f"forward.alpha must be > 0, got {self.alpha:g}")
            if weight is None:
                raise ValueError(f"forward.alpha: the {self.name} model has no weight; drop forward.alpha")
            try:
                make_forward(self.name, 1, **{weight: self.alpha})
            except ValueError as exc:
                raise ValueError(f"forward.alpha={self.alpha:g}: {exc}") from None
        return self


class _SamplerConfigMethods:
    """What ``SamplerConfig`` adds to the fields of ``SamplerSettings`` (no fields here)."""

    @property
    def nfe(self) -> int:
        return self.steps  # type: ignore[attr-defined]


SamplerConfig = pydantic_model(SamplerSettings, "SamplerConfig", __name__, methods=_SamplerConfigMethods, doc=(
    "How to sample the joint posterior: the fields, defaults and rules of "
    ":class:`pipeline.posterior.sampler.SamplerSettings` (declared there, once), validated; ``settings()`` "
    "returns the dataclass. Rule, schedule and solver names are checked against their registries."))


class CorruptConfig(_Strict):
    """``jointdiff corrupt``: observations of clean images under structured noise."""

    clean: str | None = Field(None, description="clean images: embedded name or shard URI")
    noise: str | None = Field(None, description="noise images: embedded name or shard URI")
    out: str | None = Field(None, description="destination folder or URI of the observation shards")
    alpha: float = Field(0.5, gt=0, le=1, description="the forward model's weight (blend: in (0, 1))")
    forward: Literal["blend", "sum", "overlay", "composite"] | None = Field(
        None, description="default: composite for text (RGBA layers), blend for the rest")
    sigma_y: float = Field(0.0, ge=0, description="Gaussian read-out noise std ([0, 1] units)")
    split: Literal["train", "val", "test"] = Field("test", description="split of embedded datasets")
    n: int | None = Field(None, ge=1, description="observations (default: one per clean image)")
    size: Annotated[int, Field(ge=4)] | Literal["native"] = Field(
        32, description="square size of both; native: each clean image at its own size (`natural` or a shard "
                        "dataset), the noise rendered at it (stripes, text)")
    channels: int = Field(1, description="channels of the clean images: 1 (grey) or 3 (RGB)")
    noise_channel: Literal["all", "random"] = Field(
        "all", description="grey noise on RGB images: in every channel, or in one random channel (the paper)")
    seed: int = Field(0, description="seed of the pairing and the noise")
    shard_size: int = Field(1000, ge=1, description="observations per shard")
    format: Literal["shards", "png"] = Field(
        "shards", description="shards: Parquet observation shards with the truth (clean, noise, alpha) for "
                              "metrics; png: the observations alone as 8-bit PNG files named by id, a folder of "
                              "images to try `jointdiff ingest` on")

    @field_validator("channels")
    @classmethod
    def _image_channels(cls, v: int) -> int:
        if v not in (1, 3):
            raise ValueError(f"channels of the clean images must be 1 or 3, got {v}")
        return v

    @model_validator(mode="after")
    def _forward(self) -> CorruptConfig:
        from pipeline.data.corrupt import default_forward
        from pipeline.forward import FORWARD_MODELS, make_forward

        if self.forward is None and self.noise is not None:
            self.forward = default_forward(self.noise)
        weight = FORWARD_MODELS[self.forward or "blend"].weight
        if weight:
            try:
                make_forward(self.forward or "blend", 1, **{weight: self.alpha})
            except ValueError as exc:
                raise ValueError(f"alpha={self.alpha:g}: {exc}") from None
        return self


def check_ray_address(address: str | None, what: str = "--ray-address", command: str = "clean") -> None:
    """Refuse addresses that cannot run a jointdiff job: ``ray://`` (Ray Client, under which Ray Data
    and Ray Train fail: ``'Worker' object has no attribute 'core_worker'``) and the Jobs API's ``http://``."""
    if not address:
        return
    if address.startswith("ray://"):
        raise ConfigError(
            f"{what} {address}: a ray:// (Ray Client) address cannot run Ray Data or Ray Train jobs. From a machine "
            "of the cluster use the GCS address (HEAD:6379) or auto; from outside it, submit the job: "
            f"`jointdiff submit {command} ... --address http://HEAD:8265`")
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{what} {address}: that is the Jobs API (the dashboard's port), not a cluster address: submit the job "
            f"with `jointdiff submit {command} ... --address {address}`, or give the GCS address HEAD:6379")


class RayConfig(_Strict):
    """Where and how the Ray cleaning job (``jointdiff clean``) runs its actors."""

    address: str | None = Field(None, description="Ray cluster to run the driver on: HEAD:6379 (the GCS address) or "
                                                   "auto, from a machine of the cluster; default RAY_ADDRESS, else "
                                                   "an in-process local Ray. Not ray:// (Ray Client cannot run Ray "
                                                   "Data): from outside the cluster use `jointdiff submit`")
    actors: int | None = Field(None, ge=1, description="sampler actors; default one per GPU, else CPUs / threads")
    gpus_per_actor: float | None = Field(None, ge=0, description="default 1 when the cluster has GPUs, else 0")
    threads_per_actor: int | None = Field(None, ge=1, description="torch threads (and Ray CPUs) of each actor; "
                                                                  "default 2 for GPU actors, else the CPUs shared "
                                                                  "out over the pending shards or ray.actors (1 to "
                                                                  "4; 4 with ray.autoscaling)")
    stall_timeout_s: float = Field(600, ge=0, description="when no shard finishes for this long while the nodes "
                                                          "alive hold fewer actors than planned (a lost node), "
                                                          "start a fresh pool for the pending shards on the "
                                                          "nodes left (0: never)")
    autoscaling: bool = Field(False, description="the cluster adds nodes on demand (KubeRay autoscaler, cluster "
                                                 "launcher): take ray.actors and ray.gpus_per_actor as given, "
                                                 "without checking them against the nodes alive now")

    @field_validator("address")
    @classmethod
    def _no_ray_client(cls, v: str | None) -> str | None:
        check_ray_address(v, "ray.address")
        return v

    @model_validator(mode="after")
    def _autoscaling_needs_a_layout(self) -> RayConfig:
        if self.autoscaling and (self.actors is None or self.gpus_per_actor is None):
            raise ValueError("ray.autoscaling needs ray.actors and ray.gpus_per_actor: the nodes that would decide "
                             "them do not exist yet")
        return self


class GPUConfig(_Strict):
    """How the two networks run (``jointdiff clean``): speed, not the sampler's math.

    ``auto`` means on when the device is CUDA and off elsewhere, so a CPU run is unchanged."""

    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16: each network call under bfloat16 autocast; the state x, n, the residual, "
                            "the guidance loss and its gradients stay float32. auto: bf16 on CUDA, else fp32")
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="networks and their inputs in channels-last (NHWC) memory format, as tensor-core "
                            "convolutions want; the same numbers. auto: on CUDA")
    compile: bool | Literal["auto"] = Field(
        False, description="torch.compile each network once per worker: fused kernels, but tens of seconds "
                           "to start per network (minutes on a small CPU). auto: on CUDA")
    memory_margin: float = Field(0.8, gt=0, le=1, description="batch_size auto: fill this fraction of the "
                                                              "free GPU memory")
    max_batch: int = Field(512, ge=1, description="batch_size auto: at most this many sampler rows per batch")

    def runtime(self, device: str) -> Runtime:
        """The resolved settings for ``device`` (``auto`` -> on for CUDA)."""
        return Runtime.resolve(device, self.precision, self.channels_last, self.compile)


class Priors(_Strict):
    """The two priors of a clean recipe. Each is a shipped name (docs/reference/priors.md), a model folder or
    URI (``config.json`` + ``weights.safetensors``), or a registry's ``ROOT/models/NAME/latest``; a run
    resolves both once, on its driver, to a pinned version (:mod:`pipeline.run.recipe`)."""

    image: str = Field("faces", description="the prior of the clean images")
    noise: str = Field("digits", description="the prior of the structured noise")
    supervised: str | None = Field(None, description="the supervised network of sampler.path fast / routed "
                                                     "(jointdiff train-supervised); default: the one shipped for the "
                                                     "two priors")


class Recipe(_Strict):
    """What decides the pixels of a cleaning run: the priors, the forward model, the sampler and the input
    policy. A run's id and config hash hash the recipe alone, whole, with its models pinned
    (:func:`pipeline.run.identity.identify`); nothing else of a :class:`CleanConfig` may enter them."""

    priors: Priors = Field(default_factory=Priors)
    forward: ForwardConfig = Field(default_factory=ForwardConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    policy: ImagePolicy = Field(default_factory=ImagePolicy,
                                description="what an input may cost (max_pixels, max_bytes), its alpha channel, and "
                                            "another channel count than the priors': convert or reject. Images "
                                            "keep their own size (tiled over the priors' patches)")

    @field_validator("policy", mode="before")
    @classmethod
    def _no_size(cls, v: Any) -> Any:
        """Cleaning keeps each image's size: the only size bound is ``policy.max_pixels``."""
        for key, unset in (("size", None), ("resize", "error")):  # a dumped config carries them unset
            if isinstance(v, dict) and v.get(key, unset) != unset:
                raise ValueError(f"policy.{key} is gone: images are cleaned at their own size, in tiles of the "
                                 "priors' size; bound the size with policy.max_pixels (docs/changelog.md)")
        return v

    @field_validator("sampler", mode="before")
    @classmethod
    def _preset(cls, v: Any) -> Any:
        """``sampler.preset: NAME`` stands for the preset's settings (:data:`~pipeline.posterior.sampler.PRESETS`);
        keys given beside it win. The recipe keeps the settings, not the name."""
        if not isinstance(v, dict) or "preset" not in v:
            return v
        from pipeline.posterior.sampler import PRESETS

        v = dict(v)
        name = v.pop("preset")
        return {**PRESETS[str(name)], **v}


    @model_validator(mode="before")
    @classmethod
    def _forward_sampler_defaults(cls, v: Any) -> Any:
        """The forward model's own sampler defaults (:attr:`pipeline.forward.ForwardModel.sampler_defaults`) under
        the keys that ``sampler`` leaves unset (a preset is a whole choice: it takes none): the composited overlay
        samples with ``rule: projection`` and ``final_projection: false`` unless the recipe says otherwise."""
        from pipeline.forward import FORWARD_MODELS

        if not isinstance(v, dict):
            return v
        fwd = v.get("forward")
        model = FORWARD_MODELS.get(fwd.get("name") if isinstance(fwd, dict) else getattr(fwd, "name", None))
        sampler = v.get("sampler", {})
        if model is None or not model.sampler_defaults or not isinstance(sampler, dict) or "preset" in sampler:
            return v
        return {**v, "sampler": {**model.sampler_defaults, **sampler}}

    @model_validator(mode="after")
    def _linear_for_paper(self) -> Recipe:
        from pipeline.forward import FORWARD_MODELS

        if not FORWARD_MODELS[self.forward.name].linear and "paper" in (self.sampler.rule, self.sampler.solver):
            raise ValueError(f"forward.name={self.forward.name} is not linear and the paper preset's guidance needs "
                             "a linear model: use sampler.rule=dps (the default) with sampler.solver=ddim")
        return self


class Execution(_Strict):
    """Where and how a cleaning run runs: no part of its identity. Results do not depend on batching or on the
    executor; the ``gpu`` settings change them only by floating-point rounding; ``max_rejected_fraction``
    judges a run, it does not make it."""

    input: str | None = Field(None, description="observation dataset URI (when not given on the command line)")
    output: str | None = Field(None, description="output root URI (when not given on the command line)")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        32, description="images per sampler batch; auto: sized from the free GPU memory (one step's peak "
                              "memory measured at two small batches, gpu.memory_margin of what is free, at most "
                              "gpu.max_batch rows), 32 on a CPU")
    batch_pixels: int | None = Field(
        None, ge=1, description="pixels per sampler batch (images of one size; at least one image) and per "
                                "network call (tiles): what bounds memory whatever the image sizes; default: "
                                "batch_size images of the priors' size")
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (cuda when torch sees a GPU)")
    gpu: GPUConfig = Field(default_factory=GPUConfig, description="bf16, channels-last, torch.compile")
    threads: int | None = Field(None, ge=1, description="torch threads of the local executor "
                                                        "(the Ray executor: ray.threads_per_actor)")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    max_rejected_fraction: float = Field(
        0.5, ge=0, le=1, description="a run that rejects more than this fraction of its input rows fails (exit 4) "
                                     "after writing its outputs and summary row, printing the reasons grouped; "
                                     "a run that cleans no row fails at any setting")


class CleanConfig(Recipe, Execution):
    """``jointdiff clean`` and the ``clean-dataset`` flow: a :class:`Recipe` and its :class:`Execution`, flat in
    one YAML file (``priors: {image: faces, noise: digits}``, ``forward:``, ``sampler:``, ``policy:``,
    ``batch_size:``, ``ray:``...)."""

    renamed: ClassVar[dict[str, str]] = {"image_prior": "priors.image", "noise_prior": "priors.noise"}
    """Keys of earlier versions, refused with the key that replaced them (docs/changelog.md)."""

    @property
    def recipe(self) -> Recipe:
        return Recipe.model_validate({k: getattr(self, k) for k in Recipe.model_fields})

    @property
    def execution(self) -> Execution:
        return Execution.model_validate({k: getattr(self, k) for k in Execution.model_fields})


STORAGE_SETTINGS = ("endpoint_url", "region", "anon")
"""The only ``storage`` keys that an override may set. Overrides travel where secrets must not: Prefect
stores a flow run's parameters in plain text before the flow runs, and a submitted job's arguments are its
entry point, shown by ``jointdiff submit list`` and the Ray dashboard. Credentials (``storage.key``,
``secret``, ``token``) and ``storage.options`` (which can hold them) come from the config file's
``storage:`` section or the environment (``AWS_*``, the cluster's own identity)."""

_NAMES_STORAGE = re.compile(r"\s*storage\s*(?:[.=:]|\s|$)", re.IGNORECASE)


def credential_overrides(pairs: Iterable[str]) -> list[str]:
    """The keys, as typed, of the overrides among ``pairs`` that set anything under ``storage`` but one of
    :data:`STORAGE_SETTINGS` to a plain value, in any spelling: dotted (``storage.options.secret=S``), a
    mapping (``storage={secret: S}``, ``storage.options={secret: S}``), another case or spacing
    (``Storage.Secret = S``), a list or mapping under an allowed key, an endpoint URL with a password in it,
    or a pair without ``=`` that names storage (``storage.secret:S``, not parsed: its key and value cannot
    be told apart, so it is named ``storage``). Never a value, nor a key found inside a value."""
    found = []
    for pair in pairs:
        if not _NAMES_STORAGE.match(pair):
            continue
        key = pair.split("=", 1)[0].strip() if "=" in pair else "storage"
        try:
            tree = parse_overrides([pair])
        except ConfigError:
            found.append(key)
            continue
        if any(_under_storage(top, node) for top, node in tree.items()):
            found.append(key)
    return found


def _under_storage(top: str, node: Any) -> bool:
    """Whether the override ``{top: node}`` sets anything under ``storage`` but a plain allowed setting."""
    if top.strip().lower() != "storage":
        return False
    if top != "storage" or not isinstance(node, dict):
        return True
    for key, value in node.items():
        if key not in STORAGE_SETTINGS or isinstance(value, (dict, list, set, tuple)):
            return True
        if key == "endpoint_url" and "@" in str(value):  # http://KEY:SECRET@host
            return True
    return False


def refuse_credentials(pairs: Iterable[str], flag: str = "--set") -> None:
    """Refuse overrides that set storage credentials or options (:func:`credential_overrides`), in one line
    that names their keys (as ``flag KEY=...``) and never their values; before they are stored or sent anywhere."""
    keys = credential_overrides(pairs)
    if keys:
        raise ConfigError(
            f"{', '.join(f'{flag} {k}=...' for k in keys)}: only storage.endpoint_url, storage.region and "
            "storage.anon may be set by an override, which is stored and shown in plain text (a Prefect flow "
            "run's parameters, a Ray job's entry point); credentials come from the environment (AWS_*), the "
            "cluster's own identity (instance profile, Kubernetes service account) or the config file's "
            "storage: section")


def with_ray(cfg: CleanConfig, **settings: Any) -> CleanConfig:
    """``cfg`` with the given ``ray`` settings (those not None), validated like the config file."""
    over = {k: v for k, v in settings.items() if v is not None}
    if not over:
        return cfg
    check_ray_address(over.get("address"))
    try:
        ray = RayConfig.model_validate({**cfg.ray.model_dump(), **over})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = f"ray.{err['loc'][0]}: " if err["loc"] else ""
        raise ConfigError(f"invalid Ray setting: {where}{err['msg']}") from None
    return cfg.model_copy(update={"ray": ray})


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "data.hflip=true"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. --set train.steps=100")
        key, raw = pair.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {p} is set twice")
        try:
            node[parts[-1]] = load_yaml(raw, f"--set {key.strip()}=...")  # bounded: no alias bomb
        except YAMLSyntaxError as exc:
            raise ConfigError(f"--set {key.strip()}=...: the value is not valid YAML ({exc.problem}); quote it to "
                              f"pass it as text, e.g. --set '{key.strip()}=\"...\"'") from None
    return out


def _model_in(tp: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X``, ``X | None``, ``Annotated[X, ...]``), if any."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in typing.get_args(tp):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """The keys of the section that holds ``loc[-1]`` (empty if the path leaves the models)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        sub = _model_in(field.annotation) if field is not None else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _override_at(over: dict[str, Any], loc: tuple[str, ...]) -> str | None:
    """``"leaf"`` or ``"section"`` where the overrides set ``loc``; None where they do not."""
    node: Any = over
    for part in loc:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return "section" if isinstance(node, dict) else "leaf"


def _explain(model: type[BaseModel], err: Any, over: dict[str, Any]) -> str:
    """One validation error as ``KEY: problem``; KEY is ``--set KEY=...`` when an override set it."""
    loc = tuple(str(x) for x in err["loc"])
    key = ".".join(loc) or "<top>"
    problem = err["msg"].removeprefix("Value error, ")
    renamed = getattr(model, "renamed", {}).get(".".join(loc))
    if err["type"] == "extra_forbidden" and renamed:  # one line naming the new key, whatever else is wrong
        return (f"--set {key}=...: use {renamed}" if _override_at(over, loc) else f"{key}: use {renamed}") + \
            " (renamed before 1.0; see docs/changelog.md)"
    if err["type"] == "extra_forbidden" and loc:
        fields = _fields_at(model, loc)
        section = ".".join(loc[:-1])
        close = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.6)
        if close:
            problem = f"unknown key; did you mean {section + '.' if section else ''}{close[0]}?"
        else:
            problem = f"unknown key; {section or 'the config'} has {', '.join(fields)}" if fields else "unknown key"
    origin = _override_at(over, loc) if loc else None
    if origin == "leaf":
        return f"--set {key}=...: {problem}"
    return f"{key} (set by --set): {problem}" if origin == "section" else f"{key}: {problem}"


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(model: type[BaseModel], path: str | Path | None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None, section: str | None = None) -> Any:
    """Load ``path`` (YAML) into ``model``, applying ``--set`` overrides; errors name key and file.

    ``section`` picks one top-level mapping of a recipe file that configures several commands
    (``configs/celeba_mnist.yaml``: ``image_prior``, ``noise_prior``, ``corrupt``, ``clean``).
    """
    raw: dict[str, Any] = dict(defaults or {})
    where = f"{path} [{section}]" if path and section else str(path)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        loaded = read_yaml(p) or {}  # bounded; errors say where, not what (the line could hold a secret)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        if section is not None:
            if not isinstance(loaded.get(section), dict):
                raise ConfigError(f"{p}: no section '{section}'; it has {', '.join(map(str, loaded)) or 'none'}")
            loaded = loaded[section]
        raw = deep_merge(raw, loaded)
    over = parse_overrides(overrides or [])
    raw = deep_merge(raw, over)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        msgs = "; ".join(_explain(model, err, over) for err in exc.errors())
        head = f"{where}: invalid config" if path is not None else "invalid config"
        raise ConfigError(f"{head}: {msgs}") from None
