"""A pipeline folder's other models: the components its pipeline loads a LoRA into only from a file of their own
(Wan 2.2 A14B's low-noise expert `transformer_2`: diffusers' `load_lora_weights(..., load_into_transformer_2=True)`;
ComfyUI loads each expert as a model of its own). A pair of pipeline folders gets one more LoRA per such
component whose weights both hold."""

from ..arch.diffusers_model import loadable_components, together


def own_file_components(info):
    """{component: Location} of the models in a pipeline folder (`info`: the DiffusersFolder of the model read
    from it, None for a file) that take a LoRA file of their own."""
    if info is None or info.pipeline_folder is None or info.pipeline_class is None:
        return {}
    shared = set(together(info))
    return {c: info.pipeline_folder.child(c) for c in loadable_components(info) if c not in shared}


def paired_components(base_info, tuned_info):
    """({component: (base Location, tuned Location)} both folders hold, [a line for each only one holds])."""
    ours, theirs = own_file_components(base_info), own_file_components(tuned_info)
    paired = {c: (ours[c], theirs[c]) for c in ours if c in theirs}
    notes = [f"{c}: only the {'base' if c in ours else 'fine-tune'}'s pipeline folder holds it, so no LoRA is "
             f"made for it (give both as pipeline folders)" for c in sorted(set(ours) ^ set(theirs))]
    return paired, notes


def component_output(out, component):
    """`OUT_<component>.safetensors` beside `out`."""
    return out.with_name(f"{out.stem}_{component}{out.suffix}")
