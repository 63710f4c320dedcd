"""Which decoder layers each pipeline stage holds: Megatron's rule, stated once, checked before any work.

Megatron splits ``num_layers`` evenly over ``pipeline_model_parallel_size`` stages, or, with
``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``, gives the first (last)
stage that many and the rest evenly to the stages between.  The model builder asks Megatron itself
(``get_transformer_layer_offset`` / ``get_num_layers_to_build``); this module states the same rule without
a process group, so the plan, the memory plan and the schedule's cost model can use it before start-up
(``tests/test_pipeline_split.py`` checks the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass


class PipelineSplitError(ValueError):
    """A pipeline split that cannot be built; the message names the flags."""


@dataclass(frozen=True)
class PipelineSplit:
    """The decoder layers of each of ``stages`` pipeline stages (``first``/``last``: uneven end stages)."""

    num_layers: int
    stages: int = 1
    first: int | None = None
    last: int | None = None

    def validate(self) -> None:
        """Refuse (one line naming the flags) a split Megatron would refuse or that leaves a stage empty."""
        pp = self.stages
        if pp < 1:
            raise PipelineSplitError(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
        uneven = {k: v for k, v in (("first", self.first), ("last", self.last)) if v is not None}
        if uneven and pp == 1:
            raise PipelineSplitError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
        for name, n in uneven.items():
            if n < 1:
                raise PipelineSplitError(
                    f"--decoder-{name}-pipeline-num-layers {n} leaves the {name} stage without layers"
                )
        if not uneven:
            if self.num_layers % pp:
                raise PipelineSplitError(
                    f"--pipeline-model-parallel-size {pp} does not divide the model's {self.num_layers} layers; "
                    "give --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for an uneven split"
                )
            return
        rest = self.num_layers - sum(uneven.values())
        middle = pp - len(uneven)
        given = " + ".join(f"--decoder-{k}-pipeline-num-layers {v}" for k, v in uneven.items())
        if middle == 0:
            if rest != 0:
                raise PipelineSplitError(
                    f"{given} = {self.num_layers - rest}, not the model's {self.num_layers} layers"
                )
            return
        if rest < middle or rest % middle:
            raise PipelineSplitError(
                f"{given} leave {rest} of the model's {self.num_layers} layers for the {middle} other stage(s) of "
                f"--pipeline-model-parallel-size {pp}: "
                + ("not every stage gets a layer" if rest < middle else f"{rest} does not split evenly over {middle}")
            )

    def counts(self) -> list[int]:
        """Layers per stage, first to last."""
        self.validate()
        pp = self.stages
        if self.first is None and self.last is None:
            return [self.num_layers // pp] * pp
        rest = self.num_layers - (self.first or 0) - (self.last or 0)
        middle = pp - (self.first is not None) - (self.last is not None)
        counts = [rest // middle if middle else 0] * pp
        if self.first is not None:
            counts[0] = self.first
        if self.last is not None:
            counts[-1] = self.last
        return counts

    def ranges(self) -> list[range]:
        """The global (0-based) layer indices of every stage."""
        out, start = [], 0
        for n in self.counts():
            out.append(range(start, start + n))
            start += n
        return out

    def layers(self, stage: int) -> range:
        """Stage ``stage``'s global layer indices."""
        return self.ranges()[stage]

    def stage_of(self, layer: int) -> int:
        """The stage that holds global layer ``layer``."""
        for stage, r in enumerate(self.ranges()):
            if layer in r:
                return stage
        raise IndexError(f"layer {layer} is not one of the model's {self.num_layers}")

    def stages_holding(self, layers: tuple[int, ...] | list[int]) -> list[int]:
        """The stages that hold any of ``layers`` (e.g. the fast layers), first to last."""
        return sorted({self.stage_of(i) for i in layers})

    def describe(self) -> str:
        """``'stage 0: layers 0-13, stage 1: layers 14-27'``."""
        return ", ".join(f"stage {s}: layers {r.start}-{r.stop - 1}" for s, r in enumerate(self.ranges()))
