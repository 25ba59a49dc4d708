"""A resize's inputs, parsed once at the door: each LoRA argument (one file, or several merged with weights)
becomes a `LoraInput` of `LoraSource`s; everything after takes those, never the text again."""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionError
from ..io.locations import describe, file_name

_LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")
_WEIGHTED = re.compile(r"(.+):([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)")


@dataclass(frozen=True)
class LoraSource:
    """One LoRA file (a path, URL, Hub file or PEFT folder) and the weight it is merged with."""

    path: str
    weight: float = 1.0

    def spelled(self, path=None):
        """As written on a command line: `path[:weight]` (`path`: another path for the same source)."""
        return str(self.path if path is None else path) + (f":{self.weight:g}" if self.weight != 1.0 else "")


@dataclass(frozen=True)
class LoraInput:
    """One LoRA argument: a single LoRA, or a weighted merge ('a.safetensors:0.7,b.safetensors:0.3')."""

    text: str       # as given: a merge's journal is named after it
    sources: tuple  # LoraSource, in order

    @classmethod
    def parse(cls, text):
        """Parse 'a.safetensors:0.7,b.safetensors:0.3' (drive letters like C:\\ and Hub files `owner/repo:file`
        are kept); a LoRA file followed by `:` and no number, or a weight of 0, is one line."""
        if isinstance(text, LoraInput):
            return text
        sources = tuple(_source(item) for item in str(text).split(","))
        return cls(str(text), sources)

    @property
    def first(self):
        """The first LoRA's path: where outputs go by default, whose dtype and name the outputs take."""
        return self.sources[0].path

    @property
    def merged(self):
        return len(self.sources) > 1

    @property
    def stem(self):
        """The outputs' name stem: the first LoRA's file name without its suffix, or `merged`."""
        return "merged" if self.merged else file_stem(self.first)

    def label(self, full=False):
        """As printed: file names (full: whole paths or URLs without their queries) with their weights."""
        name = describe if full else file_name
        return ",".join(source.spelled(name(source.path)) for source in self.sources)

    def with_paths(self, locate):
        """The same input with each path replaced by `locate(path)` (e.g. a local copy)."""
        return LoraInput.parse(",".join(s.spelled(locate(s.path)) for s in self.sources))

    def merge_metadata(self):
        """{"lora_colab.merge": JSON [[file name, weight], ...]} for a merge (several LoRAs or a weight other
        than 1), else {}: the file says what it was made of."""
        if not self.merged and self.sources[0].weight == 1.0:
            return {}
        return {"lora_colab.merge": json.dumps([[file_name(s.path), s.weight] for s in self.sources])}


def _source(item):
    path, weight = item, 1.0
    hit = _WEIGHTED.fullmatch(item.strip())
    if hit:
        path, weight = hit.group(1), float(hit.group(2))
    else:
        head, colon, tail = item.strip().rpartition(":")
        if colon and head.lower().endswith(_LORA_SUFFIXES) and not os.path.exists(item.strip()):
            raise OptionError(f"{item.strip()}: {tail!r} is not a merge weight; write a number after the "
                              f"colon ({file_name(head)}:0.7) or leave it out")
    path = path.strip()
    if weight == 0:
        raise OptionError(f"{file_name(path)}:0: a merge weight of 0 adds nothing; leave that LoRA out")
    return LoraSource(path, weight)


def file_stem(source):
    """A file's name without its suffix, for a path, a URL (no query) or a Hub `owner/repo:file`."""
    name = file_name(source)
    return name[:-len(".safetensors")] if name.endswith(".safetensors") else Path(name).stem
