"""The MORPHEUS network: slide and omics tokenizers, a shared encoder, omics decoders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn

from morpheus_pl.nn.grouped import GroupedMLP, GroupIndex
from morpheus_pl.nn.losses import masked_group_l1
from morpheus_pl.nn.masking import sample_visible
from morpheus_pl.nn.slide import PrototypeAttention
from morpheus_pl.nn.transformer import DecoderBlock, EncoderBlock


class OmicsTokenizer(nn.Module):
    """One token per feature group: a per-group MLP ``n_g -> width -> width``.

    Args:
        groups: Feature indices of each of the ``G`` groups.
        n_features: Length ``F`` of the modality's feature vector.
        width: Token width.
        dropout: AlphaDropout rate after each ELU.
    """

    def __init__(
        self, groups: Sequence[Sequence[int]], n_features: int, width: int, dropout: float
    ) -> None:
        super().__init__()
        self.index = GroupIndex(groups, n_features)
        self.mlp = GroupedMLP(
            self.index.sizes, [width], width, len(groups), dropout=dropout, final_activation=True
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """Map ``(B, F)`` values to ``(B, G, width)`` tokens; NaN inputs count as 0."""
        return self.mlp(self.index(torch.nan_to_num(values, nan=0.0)))


class OmicsDecoder(nn.Module):
    """Reconstruct every group of one modality from the encoder outputs.

    Each group has one query: the encoded token when that group was visible, the
    learned mask token otherwise, plus a learned group embedding. The queries pass
    through blocks of self-attention, cross-attention to all encoder outputs and an
    MLP, then per-group heads ``width -> width -> n_g``.

    Args:
        group_sizes: Feature count of each group.
        encoder_width: Width of the encoder outputs.
        width: Decoder token width.
        depth: Number of decoder blocks.
        heads: Attention heads.
        mlp_dim: Hidden width of the block MLPs.
        dropout: Dropout in the blocks.
    """

    def __init__(
        self,
        group_sizes: Sequence[int],
        encoder_width: int,
        width: int = 256,
        depth: int = 1,
        heads: int = 8,
        mlp_dim: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        n_groups = len(group_sizes)
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.empty(width))
        self.group_embedding = nn.Parameter(torch.empty(n_groups, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.group_embedding, std=0.02)
        self.blocks = nn.ModuleList(
            DecoderBlock(width, heads, mlp_dim, dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = GroupedMLP(width, [width], list(group_sizes), n_groups)

    def forward(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        encoded: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode one modality.

        Args:
            memory: ``(B, L, encoder_width)`` encoder outputs.
            memory_mask: ``(B, L)`` bool, True for real tokens.
            encoded: ``(B, G, encoder_width)`` encoder outputs of this modality's
                tokens (any value where not visible); None when none is visible.
            visible: ``(B, G)`` bool, which of this modality's tokens were inputs.

        Returns:
            ``(B, G, max_group_size)`` reconstruction; padding slots are 0.
        """
        batch = memory.shape[0]
        queries = self.mask_token.expand(batch, *self.group_embedding.shape)
        if encoded is not None and visible is not None:
            queries = torch.where(visible[..., None], self.embed(encoded), queries)
        queries = queries + self.group_embedding

        memory = self.embed(memory)
        for block in self.blocks:
            queries = block(queries, memory, memory_mask)
        return self.head(self.norm(queries))


@dataclass
class EncoderOutput:
    """Encoder outputs for a batch.

    Attributes:
        tokens: ``(B, L, width)`` all output tokens: global, slide, visible omics.
        mask: ``(B, L)`` bool, True for real tokens.
        embedding: ``(B, width)`` the global token, the patient embedding.
        slide_tokens: ``(B, P, width)`` outputs at the slide-token positions.
        omics_tokens: Modality name to ``(B, G_m, width)`` outputs at that modality's
            token positions; zero where the token was not an input.
        visible: Modality name to ``(B, G_m)`` bool, which tokens were inputs.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    embedding: torch.Tensor
    slide_tokens: torch.Tensor
    omics_tokens: dict[str, torch.Tensor]
    visible: dict[str, torch.Tensor]


@dataclass
class ReconstructionOutput:
    """Result of one masked-reconstruction pass.

    Attributes:
        loss: Sum over modalities of the masked-group mean absolute error.
        losses: Modality name to its masked-group mean absolute error.
        n_scored: Modality name to the number of groups its loss averages over.
        predictions: Modality name to ``(B, G_m, S_m)`` reconstructions.
        targets: Modality name to ``(B, G_m, S_m)`` measured values (NaN if missing).
        scored: Modality name to ``(B, G_m)`` bool, the groups scored by the loss.
        embedding: ``(B, width)`` patient embeddings of this pass.
        slide_tokens: ``(B, P, width)`` encoder outputs at the slide-token positions.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    n_scored: dict[str, torch.Tensor]
    predictions: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    scored: dict[str, torch.Tensor]
    embedding: torch.Tensor
    slide_tokens: torch.Tensor


class Morpheus(nn.Module):
    """Joint encoder of a slide and any subset of omics, with one decoder per modality.

    Args:
        patch_dim: Patch-feature dimension ``D``.
        groups: Modality name to the feature indices of each of its groups.
        n_features: Modality name to the length of its feature vector.
        width: Token width of tokenizers and encoder.
        num_prototypes: Slide tokens per slide.
        depth: Encoder blocks.
        heads: Encoder attention heads.
        mlp_dim: Hidden width of the encoder MLPs.
        dropout: Dropout in the encoder and decoders, and AlphaDropout rate in the
            omics tokenizers.
        decoder_width: Token width of the decoders.
        decoder_depth: Blocks per decoder.
        decoder_heads: Decoder attention heads.
        decoder_mlp_dim: Hidden width of the decoder MLPs.
        modality_embeddings: Add a learned embedding per token type (slide or omics
            modality). Off reproduces the reference model.
        group_embeddings: Add a learned embedding per omics token to the encoder input.
            Off reproduces the reference model.
        decoders: Build the decoders (downstream tasks drop them).
    """

    def __init__(
        self,
        patch_dim: int,
        groups: Mapping[str, Sequence[Sequence[int]]],
        n_features: Mapping[str, int],
        width: int = 256,
        num_prototypes: int = 16,
        depth: int = 1,
        heads: int = 8,
        mlp_dim: int = 256,
        dropout: float = 0.15,
        decoder_width: int = 256,
        decoder_depth: int = 1,
        decoder_heads: int = 8,
        decoder_mlp_dim: int = 256,
        modality_embeddings: bool = False,
        group_embeddings: bool = False,
        decoders: bool = True,
    ) -> None:
        super().__init__()
        self.modalities = list(groups)
        self.group_counts = [len(groups[m]) for m in self.modalities]

        self.slide_tokenizer = PrototypeAttention(patch_dim, num_prototypes, width)
        self.tokenizers = nn.ModuleDict(
            {m: OmicsTokenizer(groups[m], n_features[m], width, dropout) for m in self.modalities}
        )
        self.global_token = nn.Parameter(torch.empty(1, 1, width))
        nn.init.trunc_normal_(self.global_token, std=0.02)

        self.modality_embedding: nn.Parameter | None = None
        if modality_embeddings:
            self.modality_embedding = nn.Parameter(torch.zeros(1 + len(self.modalities), width))
            nn.init.trunc_normal_(self.modality_embedding, std=0.02)
        self.group_embedding: nn.Parameter | None = None
        if group_embeddings:
            self.group_embedding = nn.Parameter(torch.zeros(sum(self.group_counts), width))
            nn.init.trunc_normal_(self.group_embedding, std=0.02)

        self.blocks = nn.ModuleList(EncoderBlock(width, heads, mlp_dim, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

        self.decoders = nn.ModuleDict()
        if decoders:
            for m in self.modalities:
                self.decoders[m] = OmicsDecoder(
                    self.tokenizers[m].index.sizes,
                    width,
                    decoder_width,
                    decoder_depth,
                    decoder_heads,
                    decoder_mlp_dim,
                    dropout,
                )

    def compile_parts(self) -> None:
        """Compile the tokenizers, encoder blocks and decoders with ``torch.compile``.

        Parameter names do not change, so checkpoints load either way. Sequence
        lengths vary with the masks, so the encoder and decoders are compiled for
        dynamic shapes. A part that fails to compile runs eagerly instead (dynamo's
        ``suppress_errors``, a process-wide setting).
        """
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
        self.slide_tokenizer.compile()
        for tokenizer in self.tokenizers.values():
            tokenizer.compile()
        for block in self.blocks:
            block.compile(dynamic=True)
        for decoder in self.decoders.values():
            decoder.compile(dynamic=True)

    def encode(
        self,
        patches: torch.Tensor,
        patch_mask: torch.Tensor | None,
        omics: Mapping[str, torch.Tensor],
        visible: Mapping[str, torch.Tensor],
    ) -> EncoderOutput:
        """Encode a slide with the visible omics tokens.

        Args:
            patches: ``(B, N, D)`` patch features.
            patch_mask: ``(B, N)`` bool, True for real patches, or None.
            omics: Modality name to ``(B, F_m)`` values; modalities not given here
                contribute no token.
            visible: Modality name to ``(B, G_m)`` bool, which tokens are inputs. A
                modality given in ``omics`` but not here contributes no token.

        Returns:
            The encoder outputs.
        """
        slide = self.slide_tokenizer(patches, patch_mask)
        batch, n_slide, width = slide.shape
        if self.modality_embedding is not None:
            slide = slide + self.modality_embedding[0]

        # All omics tokens side by side, then the visible ones moved to the front.
        names = [m for m in self.modalities if m in omics and m in visible]
        pieces, flags = [], []
        offsets = dict(zip(self.modalities, accumulate([0, *self.group_counts])))
        for m in names:
            tokens = self.tokenizers[m](omics[m])
            if self.group_embedding is not None:
                tokens = tokens + self.group_embedding[offsets[m] : offsets[m] + tokens.shape[1]]
            if self.modality_embedding is not None:
                tokens = tokens + self.modality_embedding[1 + self.modalities.index(m)]
            pieces.append(tokens)
            flags.append(visible[m].to(torch.bool))
        omics_tokens = torch.cat(pieces, dim=1) if pieces else slide.new_zeros(batch, 0, width)
        omics_visible = (
            torch.cat(flags, dim=1)
            if flags
            else torch.zeros(batch, 0, dtype=torch.bool, device=slide.device)
        )

        n_visible = omics_visible.sum(dim=1)
        order = torch.argsort((~omics_visible).to(torch.uint8), dim=1, stable=True)
        longest = int(n_visible.max()) if batch and omics_visible.shape[1] else 0
        order = order[:, :longest]
        kept = torch.gather(omics_tokens, 1, order[..., None].expand(-1, -1, width))
        kept_mask = torch.arange(longest, device=slide.device) < n_visible[:, None]

        # (B, 1 + P + V, width): global token, slide tokens, visible omics tokens.
        sequence = torch.cat([self.global_token.expand(batch, -1, -1), slide, kept], dim=1)
        mask = torch.cat(
            [torch.ones(batch, 1 + n_slide, dtype=torch.bool, device=slide.device), kept_mask],
            dim=1,
        )
        for block in self.blocks:
            sequence = block(sequence, mask)
        sequence = self.norm(sequence)

        # Put the omics outputs back at their token positions, zero where not visible.
        encoded_kept = sequence[:, 1 + n_slide :] * kept_mask[..., None]
        encoded_all = torch.zeros_like(omics_tokens).scatter(
            1, order[..., None].expand(-1, -1, width), encoded_kept
        )
        sizes = [len(self.tokenizers[m].index.sizes) for m in names]
        per_modality = dict(zip(names, encoded_all.split(sizes, dim=1)))
        return EncoderOutput(
            tokens=sequence,
            mask=mask,
            embedding=sequence[:, 0],
            slide_tokens=sequence[:, 1 : 1 + n_slide],
            omics_tokens=per_modality,
            visible={m: visible[m].to(torch.bool) for m in names},
        )

    def decode(self, encoded: EncoderOutput, modality: str) -> torch.Tensor:
        """Reconstruct ``modality`` as ``(B, G, max_group_size)`` from the encoder outputs.

        Groups that were encoder inputs start from their encoded token; all others
        start from the mask token.
        """
        if modality not in self.decoders:
            raise KeyError(
                f"no decoder for modality {modality!r}; decoders exist for {sorted(self.decoders)}"
            )
        return self.decoders[modality](
            encoded.tokens,
            encoded.mask,
            encoded.omics_tokens.get(modality),
            encoded.visible.get(modality),
        )

    def forward_pretrain(
        self,
        patches: torch.Tensor,
        patch_mask: torch.Tensor | None,
        omics: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        mask_ratio: float,
        generator: torch.Generator | None = None,
        uniform: torch.Tensor | None = None,
    ) -> ReconstructionOutput:
        """Mask omics tokens at random, encode, decode every modality and score.

        Args:
            patches: ``(B, N, D)`` patch features.
            patch_mask: ``(B, N)`` bool, True for real patches, or None.
            omics: Modality name to ``(B, F_m)`` values, NaN for missing values. A
                modality of the model absent from this mapping counts as absent for
                every sample.
            present: Modality name to ``(B,)`` bool, whether the sample has it.
            mask_ratio: Fraction of each sample's omics tokens to mask.
            generator: Random generator for the masks, on the batch's device.
            uniform: ``(B, M + sum(G_m))`` per-sample draws in [0, 1) that fix the
                masks in place of ``generator`` (see ``sample_visible``).

        Returns:
            Losses, predictions and masks of the pass.
        """
        batch = patches.shape[0]
        values, has = {}, []
        for m in self.modalities:
            if m in omics:
                values[m] = omics[m]
                has.append(present[m].to(torch.bool))
            else:
                n = self.tokenizers[m].index.n_features
                values[m] = patches.new_zeros(batch, n, dtype=torch.float32)
                has.append(torch.zeros(batch, dtype=torch.bool, device=patches.device))
        has_matrix = torch.stack(has, dim=1)

        drawn = sample_visible(self.group_counts, has_matrix, mask_ratio, generator, uniform)
        visible = dict(zip(self.modalities, drawn))
        encoded = self.encode(patches, patch_mask, values, visible)

        # Every tokenizer and decoder runs even when no sample of the batch has its
        # modality, and the loss stays attached to their outputs: DDP without
        # find_unused_parameters needs a gradient for every parameter on every process.
        losses, n_scored, predictions, targets, scored = {}, {}, {}, {}, {}
        for i, m in enumerate(self.modalities):
            index = self.tokenizers[m].index
            predictions[m] = self.decode(encoded, m)
            targets[m] = index(values[m])
            scored[m] = ~visible[m] & has_matrix[:, i : i + 1]
            losses[m], n_scored[m] = masked_group_l1(
                predictions[m], targets[m], index.valid, scored[m]
            )
        return ReconstructionOutput(
            loss=torch.stack(list(losses.values())).sum(),
            losses=losses,
            n_scored=n_scored,
            predictions=predictions,
            targets=targets,
            scored=scored,
            embedding=encoded.embedding,
            slide_tokens=encoded.slide_tokens,
        )

