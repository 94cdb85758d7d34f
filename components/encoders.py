"""Multi-modal steps (paper 3.2): semantic IDs, graph + node2vec, table encoders, and the Q-former's phase I.

The encoders read the same inputs and not each other's outputs, so the pipeline runs them in parallel;
phase I reads them all.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def encode_graph(sequences: Input[Dataset], graph_config: str, graph_overrides: dict, graph: Output[Dataset], summary: Output[Markdown]):
    """Co-occurrence graph of the training events (15-minute intervals) -> node2vec embedding per behaviour."""
    from gts_lum.config import struct_parameter
    from gts_lum.encoders.node2vec import graph_summary_markdown, run_graph_encoder

    meta = run_graph_encoder(sequences.path, graph.path, graph_config or "pkg:encoders/graph.yaml", struct_parameter(graph_overrides))
    graph.metadata.update({k: v for k, v in meta.items() if isinstance(v, (int, float, str))})
    with open(summary.path, "w") as f:
        f.write(graph_summary_markdown(graph.path))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def semantic_ids(clean: Input[Dataset], tokenizer_config: str, tokenizer_overrides: dict, ids: Output[Dataset], summary: Output[Markdown]):
    """Text embeddings of behaviour descriptions -> spectral-clustering tree -> semantic ID per behaviour."""
    import shutil

    from gts_lum.config import struct_parameter
    from gts_lum.tokenizer.semantic_ids import tokenize_dataset

    card = tokenize_dataset(
        clean.path, ids.path, tokenizer_config or "pkg:tokenizer/default.yaml", struct_parameter(tokenizer_overrides), progress=False
    )
    ids.metadata.update({k: v for k, v in card.items() if isinstance(v, (int, float, str))})
    ids.metadata["codebook_sizes"] = card["codebook_sizes"]
    shutil.copyfile(f"{ids.path}/summary.md", summary.path)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def qformer_pretrain(
    sequences: Input[Dataset],
    ids: Input[Dataset],
    graph: Input[Dataset],
    tables: Input[Dataset],
    qformer_config: str,
    qformer_overrides: dict,
    qformer: Output[Model],
    metrics: Output[Metrics],
):
    """Phase I: the Q-former aligns business embeddings with semantic IDs (six alignment tasks) -> fused b^F."""
    from pathlib import Path

    from gts_lum.config import struct_parameter
    from gts_lum.stages.phase1 import run_phase1

    table = Path(tables.path) / "behavior_table.npz"
    summary = run_phase1(
        sequences.path,
        qformer.path,
        ids.path,
        graph.path,
        table if table.exists() else None,
        qformer_config or "pkg:qformer/default.yaml",
        struct_parameter(qformer_overrides),
    )
    qformer.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    for key, value in summary["final"].items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, value)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def encode_tables(clean: Input[Dataset], table_config: str, behavior_overrides: dict, user_overrides: dict, tables: Output[Dataset]):
    """Attribute tables -> business embedding per behaviour (Q-former "table" modality) and per user (profile)."""
    from gts_lum.config import struct_parameter
    from gts_lum.stages.tables import encode_tables as encode

    summary = encode(
        clean.path,
        tables.path,
        table_config or "pkg:encoders/table.yaml",
        struct_parameter(behavior_overrides),
        table_config or "pkg:encoders/table.yaml",
        struct_parameter(user_overrides),
    )
    for name, info in summary.items():
        tables.metadata[f"{name}_rows"] = info["rows"]
        tables.metadata[f"{name}_dim"] = info["dim"]
        tables.metadata[f"{name}_kind"] = info["kind"]
