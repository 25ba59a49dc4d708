"""The opener: any source (a file, an index, a model or pipeline folder; local, URL or Hub) to the container
that reads it. Sits on top of the containers (`checkpoint`, `pickles`, `gguf`), which never import it."""

import json
import posixpath
from dataclasses import dataclass, field

from ..errors import CheckpointError, LoraColabError
from .checkpoint import Checkpoint, SafetensorsFile, ShardedCheckpoint
from .locations import Location, locate, missing
from .pickles import PICKLE_SUFFIXES, open_pickle


_MODEL_SUBFOLDERS = ("transformer", "unet")


_PREFERRED_STEMS = ("diffusion_pytorch_model", "model")


class PipelineCheckpoint(Checkpoint):
    """Components of a diffusers pipeline folder read as one checkpoint whose keys carry the component's
    name (`unet.conv_in.weight`): by default an SD1.5/SDXL pipeline's `unet/`, `text_encoder/` and
    `text_encoder_2/` (each a single file or shards; `*.fp16.*` variants taken when they are all there is),
    else the `components` named (those present are read). vae/, tokenizer/, scheduler/ are not read."""

    COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

    def __init__(self, folder, components=COMPONENTS):
        folder = locate(folder)
        parts, locations, metadata = [], {}, {}
        try:
            for component in components:
                if component not in folder.list() or not folder.child(component).is_dir():
                    continue
                part = open_checkpoint(resolve_folder(folder.child(component)))
                parts.append(part)
                for key in part.keys():
                    locations[f"{component}.{key}"] = part._locations[key]
                for key, value in part.metadata.items():
                    metadata.setdefault(key, value)
        except BaseException:
            for part in parts:
                part.close()
            raise
        super().__init__(folder.display, [raw for part in parts for raw in part._files], locations, metadata)
        self.index_bytes = sum(part.index_bytes for part in parts)
        self.index_remote = folder.remote


def open_checkpoint(source, token=None):
    """Open a `.safetensors` or `.gguf` file, a `*.safetensors.index.json`, or a model/pipeline folder, from a
    local path, a URL or the Hub (see io.locations.locate; `token` is for plain URLs).

    Folders: a diffusers pipeline (its `transformer/` or `unet/`), a diffusers model folder with shards
    and an index, or a folder holding one `.safetensors` file. Remote files are read in place, by range.
    Returns a Checkpoint; use it as a context manager to close its files.
    """
    location = locate(source, token)
    if location.is_dir() and is_sd_pipeline(location):
        return PipelineCheckpoint(location)
    folder = None
    if location.is_dir():
        folder, location = location, resolve_folder(location)
    elif not location.exists():
        raise CheckpointError(location.display, missing(location))
    ckpt = _open_file(location)
    if folder is not None:
        ckpt.diffusers = diffusers_folder(folder, location)
    return ckpt


def _open_file(location):
    name = location.name.lower()
    if name.endswith(".index.json"):
        return ShardedCheckpoint(location)
    if name.endswith(PICKLE_SUFFIXES):
        return open_pickle(location)
    if name.endswith(".gguf"):
        from .gguf import GGUFFile
        return GGUFFile(location)
    return SafetensorsFile(location)


def is_sd_pipeline(folder):
    """A diffusers pipeline whose model is a UNet (SD1.5/SDXL): its text encoders are read too."""
    entries = folder.list()
    return ("unet" in entries and "transformer" not in entries and folder.child("unet").is_dir()
            and _has_weights(folder.child("unet")))


def resolve_folder(folder):
    """The file (single or index) that `open_checkpoint` reads for a folder (any Location or path)."""
    folder = locate(folder) if not isinstance(folder, Location) else folder
    entries = folder.list()
    for sub in _MODEL_SUBFOLDERS:
        if sub in entries and folder.child(sub).is_dir() and _has_weights(folder.child(sub)):
            return resolve_folder(folder.child(sub))
    indexes = [e for e in entries if e.endswith(".safetensors.index.json")]
    if indexes:
        return folder.child(_pick(folder, indexes, ".safetensors.index.json"))
    files = [e for e in entries if e.endswith(".safetensors")]
    if files:
        return folder.child(_pick(folder, files, ".safetensors"))
    raise CheckpointError(folder.display, "folder holds no .safetensors file, index, transformer/ or unet/")


def _has_weights(folder):
    return any(e.endswith((".safetensors", ".safetensors.index.json")) for e in folder.list())


def _pick(folder, candidates, suffix):
    if len(candidates) == 1:
        return candidates[0]
    for stem in _PREFERRED_STEMS:
        if stem + suffix in candidates:
            return stem + suffix
    raise CheckpointError(folder.display, f"several checkpoints here ({', '.join(sorted(candidates))}); "
                                          f"name the one to use")


@dataclass(frozen=True)
class DiffusersFolder:
    """What a diffusers folder's configs say: the model's class (`config.json`), and where the folder is a
    pipeline's component, the pipeline's class (`model_index.json`) and the component's name."""

    model_class: str
    pipeline_class: str = None
    component: str = None
    config: dict = field(default=None, compare=False, repr=False)  # the model's config.json
    # where the folder given was the pipeline's own (not one component's): it, and its model_index.json
    pipeline_folder: Location = field(default=None, compare=False, repr=False)
    index: dict = field(default=None, compare=False, repr=False)

    def component_config(self, component):
        """The config.json of another component of the pipeline folder given (None where there is none)."""
        if self.pipeline_folder is None:
            return None
        return small_json(self.pipeline_folder.child(component).child("config.json"))

    def has_weights(self, component):
        """Whether the pipeline folder given holds weights for `component` (a folder of them)."""
        if self.pipeline_folder is None or component not in (self.index or {}):
            return False
        folder = self.pipeline_folder.child(component)
        return component in self.pipeline_folder.list() and folder.is_dir() and _has_weights(folder)

    def describe(self):
        where = f", the {self.component} of {self.pipeline_class}" if self.pipeline_class else ""
        return f"diffusers {self.model_class}{where}"


def diffusers_folder(folder, weights):
    """The DiffusersFolder of a folder opened through `weights` (its resolved file), or None when no
    `config.json` beside the weights names a class (a diffusers class, or the transformers class of a
    pipeline's text encoder)."""
    config = small_json(weights.sibling("config.json"))
    model_class = config.get("_class_name") if isinstance(config, dict) else None
    component = posixpath.basename(posixpath.dirname(weights.display.replace("\\", "/").rstrip("/")))
    index = small_json(weights.sibling("../model_index.json"))
    pipeline = index.get("_class_name") if isinstance(index, dict) else None
    in_pipeline = isinstance(pipeline, str) and component in index
    if not isinstance(model_class, str) and in_pipeline and isinstance(config, dict):
        names = config.get("architectures")
        model_class = names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None
    if not isinstance(model_class, str):
        return None
    if not in_pipeline:
        return DiffusersFolder(model_class, config=config)
    given = folder if folder.display.rstrip("/") != weights.sibling(".").display.rstrip("/") else None
    return DiffusersFolder(model_class, pipeline, component, config, given, index if given else None)


def open_components(info, components):
    """The pipeline folder of DiffusersFolder `info` read as one checkpoint of `components` (names prefixed)."""
    return PipelineCheckpoint(info.pipeline_folder, components)


def small_json(location, limit=1 << 20):
    """A small JSON file's content, or None when it is missing, too large or not JSON."""
    try:
        if not location.exists():
            return None
        with location.open() as raw:
            if raw.size > limit:
                return None
            return json.loads(raw.pread(raw.size, 0).decode("utf-8"))
    except (OSError, ValueError, LoraColabError, NotImplementedError):
        return None
