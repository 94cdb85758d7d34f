"""Sequence building: events -> EventLog, split, behaviour statistics, token sequences (timestamp process)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def build_sequences(
    clean: Input[Dataset],
    sequence_config: str,
    sequence_overrides: dict,
    split_config: dict,
    sequences: Output[Dataset],
    preview: Output[Markdown],
):
    """Timestamp process (15-minute intervals, descriptors, [SEP], token budget) over the split's histories."""
    import shutil

    from gts_lum.config import from_dict, struct_parameter
    from gts_lum.sequence.dataset import SplitConfig, build_sequence_dataset

    summary = build_sequence_dataset(
        clean.path,
        sequences.path,
        sequence_config or None,
        struct_parameter(sequence_overrides),
        from_dict(SplitConfig, struct_parameter(split_config)),
    )
    sequences.metadata.update(summary)
    shutil.copyfile(f"{sequences.path}/preview.md", preview.path)
