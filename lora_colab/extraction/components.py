"""A pipeline folder's other models: those its pipeline's LoRA loader takes that the main file does not hold.
Wan 2.2 A14B's low-noise expert `transformer_2`, which diffusers loads only from a file of its own
(`load_lora_weights(..., load_into_transformer_2=True)`) and ComfyUI as a model of its own; and the text encoders
of a family with a table here (Flux.1's CLIP-L, SD3.5's CLIP-L and bigG), whose file names the transformer the
family's way: each gets a file of its own in the diffusers names its pipeline's loader takes
(`text_encoder.<module>`, which ComfyUI's CLIP key map also reads). A pair of pipeline folders gets one more
LoRA per such component both hold (none where the component did not change)."""

from ..arch.diffusers_model import loadable_components


def own_file_components(info, included=(), text_encoders=True):
    """{component: Location} of the models in a pipeline folder (`info`: the DiffusersFolder of the model read
    from it, None for a file) that its LoRA loader takes, but the main file (holding `included`) does not; the
    text encoders only with `text_encoders`."""
    if info is None or info.pipeline_folder is None or info.pipeline_class is None:
        return {}
    return {c: info.pipeline_folder.child(c) for c in loadable_components(info)
            if c not in included and (text_encoders or not c.startswith("text_encoder"))}


def paired_components(base_info, tuned_info, included=(), text_encoders=True):
    """({component: (base Location, tuned Location)} both folders hold, [a line for each only one holds])."""
    ours, theirs = (own_file_components(info, included, text_encoders) for info in (base_info, tuned_info))
    paired = {c: (ours[c], theirs[c]) for c in ours if c in theirs}
    notes = [f"{c}: only the {'base' if c in ours else 'fine-tune'}'s pipeline folder holds it, so no LoRA is "
             f"made for it (give both as pipeline folders)" for c in sorted(set(ours) ^ set(theirs))]
    return paired, notes


def component_output(out, component):
    """`OUT_<component>.safetensors` beside `out`."""
    return out.with_name(f"{out.stem}_{component}{out.suffix}")
