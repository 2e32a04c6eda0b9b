"""The rollout engine: Flow-GRPO trajectories and TempFlow-GRPO branched rollouts, packed into large batches.

Every latent being denoised is a *track* that follows its own σ schedule. The engine keeps a queue of tracks
and repeatedly evaluates the transformer on up to ``batch_size`` of them at once, whatever their timesteps
(the transformer takes a per-sample timestep), then advances each by one step:

- a **main** track is a deterministic ODE path; at each branch step i its velocity, already computed for
  the path, also gives the shared mean of G SDE **children** x_{i+1}^j (no extra transformer call);
- a **child** track finishes with the ODE (optionally on a coarser grid) and becomes one scored sample;
- a **trajectory** track (Flow-GRPO) takes SDE steps inside its SDE window and ODE steps elsewhere.

Noise comes from generators seeded per (track seed, step, child), so results do not depend on how tracks
are packed into batches. Each SDE step taken becomes a training transition (x_i, x_{i+1}, log p_old). ``on_finished(sample_index,
prompt_index, latents)`` is called as scored samples finish, so decoding and scoring can overlap the rollout.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from .policies.base import FlowPolicy, PromptEmbeds
from .sampling import StepOutput, StochasticStep, ode_step

_INITIAL, _CHILD, _TRAJECTORY = 0, 1, 2  # noise stream tags


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose state is a pure function of the integers in ``key``."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([abs(int(k)) for k in key]).generate_state(1)[0]))


def seeded_noise(shape: tuple[int, ...], *key: int) -> torch.Tensor:
    """Standard normal noise on the CPU, a pure function of the integer ``key``."""
    return torch.randn(shape, generator=seeded_generator(*key), dtype=torch.float32)


class Rows:
    """A dataclass of per-row tensors (None: not set) that the optimizer splits into micro-batches."""

    def __len__(self) -> int:
        return len(self.sample_index)

    def select(self, index: torch.Tensor):
        return type(self)(**{f.name: None if (v := getattr(self, f.name)) is None else v[index] for f in fields(self)})

    @classmethod
    def cat(cls, parts: list):
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)
                      if getattr(parts[0], f.name) is not None})


@dataclass
class Transitions(Rows):
    """Training rows: one stochastic step x_i → x_{i+1} each, with what the loss needs to score it again."""

    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    sigmas_next: torch.Tensor
    prompt_index: torch.Tensor
    """Row → index into the rollout's prompt embeddings."""
    sample_index: torch.Tensor
    """Row → the scored sample whose advantage this step takes."""
    step_index: torch.Tensor
    advantages: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    """1 for rows the loss mean counts, 0 for rows it leaves out (``loss_mean_over``)."""
    reference_mean: torch.Tensor | None = None
    """The reference policy's step mean (KL term), computed once per rollout when ``beta > 0``."""
    selection: torch.Tensor | None = None
    """What block-sparse attention / token pruning selected for the row's velocity in the rollout, ``[rows, c,
    total]`` (:attr:`~tempflow.policies.FlowPolicy.last_selection`); recomputation replays it. None: nothing selects."""

    @property
    def device(self) -> torch.device:
        return self.log_probs.device



@dataclass
class RolloutBatch:
    """One rollout, from engine to loss: the rows to train on, the scored samples with the keys that group them,
    the prompt embeddings that rows and samples index, and the stochastic step that drew the rows (the loss
    rescores them with the same object)."""

    transitions: Rows | None
    """:class:`Transitions` (GRPO), :class:`~tempflow.nft.ForwardRows` (DiffusionNFT; set after the rollout)."""
    final_latents: torch.Tensor
    sample_prompt_index: torch.Tensor
    """Sample → index into the rollout's prompts (and ``embeds``)."""
    sample_trajectory: torch.Tensor
    """Sample → the ODE main path (branched) or the SDE trajectory (un-branched) it comes from."""
    sample_step: torch.Tensor
    """Sample → the branch step it was credited to (−1 for full trajectories)."""
    sample_group: torch.Tensor
    """Sample → advantage group id, set once from the keys above by the engine's rollout method."""
    embeds: PromptEmbeds
    step: StochasticStep
    num_model_evals: int
    """Transformer evaluations of one latent each (CFG's doubled batch counts once)."""


@dataclass
class _RunResult:
    rows: Transitions | None
    final_latents: torch.Tensor
    num_model_evals: int


@dataclass
class _Track:
    latents: torch.Tensor  # [1, ...] on the policy's device
    sigmas: torch.Tensor  # the schedule this track follows (CPU float32), ends at 0
    prompt_index: int
    seed: int
    kind: str  # "main" (ODE path that spawns children) | "ode" (ODE to the end, scored) | "trajectory"
    position: int = 0
    sample_index: int = -1  # where the final latent goes; -1 for main tracks
    trajectory_index: int = -1  # main: which (prompt, seed) path this is
    branch_positions: tuple = ()  # main: sorted steps where children branch
    num_children: int = 0  # main: children per branch step
    child_num_steps: int | None = None  # main: ODE steps a child may take to finish
    sde_positions: frozenset = field(default_factory=frozenset)  # trajectory: where steps are stochastic
    trained_positions: frozenset = field(default_factory=frozenset)  # trajectory: steps that become rows

    @property
    def sigma(self) -> float:
        return float(self.sigmas[self.position])

    @property
    def sigma_next(self) -> float:
        return float(self.sigmas[self.position + 1])

    @property
    def finished(self) -> bool:
        return self.position == len(self.sigmas) - 1


def coarsen_schedule(sigmas: torch.Tensor, max_steps: int | None) -> torch.Tensor:
    """Keep at most ``max_steps`` steps of a schedule, evenly spaced in index, keeping both ends."""
    num_steps = len(sigmas) - 1
    if max_steps is None or num_steps <= max_steps:
        return sigmas
    keep = np.unique(np.round(np.linspace(0, num_steps, max_steps + 1)).astype(int))
    return sigmas[torch.from_numpy(keep)]


class RolloutEngine:
    """Runs rollouts for a policy. ``batch_size`` bounds the latents per transformer call (before CFG)."""

    def __init__(self, policy: FlowPolicy, noise_level: float, sde_type: str = "sde", batch_size: int = 16):
        self.policy = policy
        self.step = StochasticStep(sde_type, noise_level)
        self.batch_size = batch_size

    # --- public rollouts -----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, embeds: PromptEmbeds, prompt_index, seeds, num_steps: int) -> torch.Tensor:
        """Deterministic ODE samples (evaluation): final latents, one per (prompt index, seed)."""
        sigmas = self.policy.sigma_schedule(num_steps)
        tracks = [self._start(sigmas, p, s, "ode", sample_index=k) for k, (p, s) in enumerate(zip(prompt_index, seeds))]
        result = self._run(tracks, embeds, len(tracks))
        return result.final_latents

    @torch.no_grad()
    def trajectories(
        self,
        embeds: PromptEmbeds,
        prompt_index: list[int],
        seeds: list[int],
        group_ids: list[int],
        num_steps: int,
        sde_window: tuple[int, int] | None = None,
        on_finished=None,
    ) -> RolloutBatch:
        """Flow-GRPO: one SDE trajectory per (prompt index, seed). With ``sde_window = (start, size)`` only
        steps ``start .. start+size−1`` are stochastic (ODE elsewhere); otherwise every step is. Every
        stochastic step but the last of the trajectory is a training row."""
        if sde_window is None:
            sde_positions = frozenset(range(num_steps))
        else:
            sde_positions = frozenset(range(sde_window[0], sde_window[0] + sde_window[1]))
        return self._trajectory_batch(embeds, prompt_index, seeds, group_ids, num_steps, sde_positions, on_finished)

    @torch.no_grad()
    def samples(self, embeds: PromptEmbeds, prompt_index: list[int], seeds: list[int], group_ids: list[int],
                num_steps: int, on_finished=None) -> RolloutBatch:
        """ODE samples, one per (prompt index, seed), grouped by ``group_ids``, with no training rows: for
        objectives that train on the final samples (DiffusionNFT)."""
        return self._trajectory_batch(embeds, prompt_index, seeds, group_ids, num_steps, frozenset(), on_finished)

    def _trajectory_batch(self, embeds, prompt_index, seeds, group_ids, num_steps, sde_positions,
                          on_finished) -> RolloutBatch:
        self._refuse_softpag()
        sigmas = self.policy.sigma_schedule(num_steps)
        trained = frozenset(p for p in sde_positions if p < num_steps - 1)
        tracks = [
            self._start(sigmas, p, s, "trajectory", sample_index=k, sde_positions=sde_positions,
                        trained_positions=trained)
            for k, (p, s) in enumerate(zip(prompt_index, seeds))
        ]
        result = self._run(tracks, embeds, len(tracks), on_finished)
        samples = len(tracks)
        return self._batch(result, embeds, prompt_index=torch.as_tensor(prompt_index, dtype=torch.long),
                           trajectory=torch.arange(samples), step=torch.full((samples,), -1, dtype=torch.long),
                           group=torch.as_tensor(group_ids, dtype=torch.long))

    @torch.no_grad()
    def branched(
        self,
        embeds: PromptEmbeds,
        prompt_index: list[int],
        seeds: list[int],
        num_steps: int,
        branch_steps: list[int],
        num_children: int,
        child_num_steps: int | None = None,
        on_finished=None,
        group_by: str = "seed",
    ) -> RolloutBatch:
        """TempFlow-GRPO: an ODE main path per (prompt index, seed), with ``num_children`` SDE children at each
        of ``branch_steps``, each finished with the ODE. Sample ``(trajectory, branch step, child)`` sits at
        index ``(t·len(branch_steps) + b)·num_children + j``. ``group_by`` ``"seed"`` groups the siblings of one
        branch point (same trajectory and step), ``"prompt"`` all children of a prompt at one step."""
        self._refuse_softpag()
        sigmas = self.policy.sigma_schedule(num_steps)
        branch_steps = sorted(branch_steps)
        tracks = [
            self._start(sigmas, p, s, "main", trajectory_index=t, branch_positions=tuple(branch_steps),
                        num_children=num_children, child_num_steps=child_num_steps)
            for t, (p, s) in enumerate(zip(prompt_index, seeds))
        ]
        num_samples = len(tracks) * len(branch_steps) * num_children
        result = self._run(tracks, embeds, num_samples, on_finished)
        per_trajectory = len(branch_steps) * num_children
        sample = torch.arange(num_samples)
        trajectory, slot = sample // per_trajectory, (sample % per_trajectory) // num_children
        prompt = torch.as_tensor(prompt_index, dtype=torch.long)[trajectory]
        owner = {"seed": trajectory, "prompt": prompt}[group_by]
        return self._batch(result, embeds, prompt_index=prompt, trajectory=trajectory,
                           step=torch.as_tensor(branch_steps)[slot], group=owner * len(branch_steps) + slot)

    def _batch(self, result: _RunResult, embeds: PromptEmbeds, prompt_index, trajectory, step, group) -> RolloutBatch:
        return RolloutBatch(
            transitions=result.rows, final_latents=result.final_latents, sample_prompt_index=prompt_index,
            sample_trajectory=trajectory, sample_step=step, sample_group=group, embeds=embeds, step=self.step,
            num_model_evals=result.num_model_evals,
        )

    def _refuse_softpag(self) -> None:
        """Training rollouts must use the velocity that log-prob recomputation uses; SoftPAG is for sampling."""
        if getattr(self.policy, "softpag", None) is not None:
            raise ValueError(
                "SoftPAG guidance is for sampling and evaluation only: training rollouts and their log-prob "
                "recomputation must share one velocity (call policy.set_softpag(None) first)"
            )

    # --- the packed loop -----------------------------------------------------------------------------------
    def _start(self, sigmas, prompt_index, seed, kind, **kwargs) -> _Track:
        noise = self.policy.initial_noise(seeded_generator(seed, _INITIAL))
        return _Track(noise.to(self.policy.device), sigmas, int(prompt_index), int(seed), kind, **kwargs)

    def _run(self, tracks: list[_Track], embeds: PromptEmbeds, num_samples: int, on_finished=None) -> _RunResult:
        queue = deque(tracks)
        finals: list[torch.Tensor | None] = [None] * num_samples
        rows: list[dict] = []
        num_evals = 0
        while queue:
            batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
            latents = torch.cat([t.latents for t in batch])
            sigma = torch.tensor([t.sigma for t in batch], device=latents.device)
            sigma_next = torch.tensor([t.sigma_next for t in batch], device=latents.device)
            velocity = self.policy.velocity(latents, sigma, embeds[[t.prompt_index for t in batch]])
            selection = self.policy.last_selection
            num_evals += len(batch)
            next_latents = ode_step(latents, velocity, sigma, sigma_next).next_latents
            self._trajectory_sde_steps(batch, latents, velocity, sigma, sigma_next, next_latents, rows, selection)
            finished = []
            for k, track in enumerate(batch):
                if track.kind == "main" and track.position in track.branch_positions:
                    picked = None if selection is None else selection[k : k + 1]
                    queue.extend(self._spawn_children(track, latents[k : k + 1], velocity[k : k + 1], rows, picked))
                track.latents = next_latents[k : k + 1]
                track.position += 1
                if not track.finished:
                    queue.append(track)
                elif track.sample_index >= 0:
                    finals[track.sample_index] = track.latents
                    finished.append(track)
            if finished and on_finished is not None:
                on_finished([t.sample_index for t in finished], [t.prompt_index for t in finished],
                            torch.cat([t.latents for t in finished]))
        transitions = Transitions.cat([Transitions(**r) for r in rows]) if rows else None
        if transitions is not None and transitions.selection is not None:
            transitions.selection = transitions.selection.cpu()  # one transfer per rollout; replays move rows back
        return _RunResult(transitions, torch.cat(finals), num_evals)

    def _trajectory_sde_steps(self, batch: list[_Track], latents, velocity, sigma, sigma_next, next_latents, rows,
                              selection=None) -> None:
        """Replace the ODE step of the batch's trajectory tracks inside their SDE window with the stochastic step
        (in place in ``next_latents``); trained positions become rows."""
        stochastic = [k for k, t in enumerate(batch) if t.kind == "trajectory" and t.position in t.sde_positions]
        if not stochastic:
            return
        out = self.step(
            latents[stochastic], velocity[stochastic], sigma[stochastic], sigma_next[stochastic],
            noise=torch.stack([
                seeded_noise(tuple(latents.shape[1:]), batch[k].seed, _TRAJECTORY, batch[k].position)
                for k in stochastic
            ]).to(latents.device),
        )
        next_latents[stochastic] = out.next_latents
        for j, k in enumerate(stochastic):
            if batch[k].position in batch[k].trained_positions:
                picked = None if selection is None else selection[k : k + 1]
                rows.append(self._row(batch[k], latents[k : k + 1], _index_output(out, j), batch[k].sample_index,
                                      picked))

    def _spawn_children(self, track: _Track, latents, velocity, rows, selection=None) -> list[_Track]:
        """G SDE children of a main track at its current step, sharing the main path's velocity (and mean)."""
        g = track.num_children
        noise = torch.stack([
            seeded_noise(tuple(latents.shape[1:]), track.seed, _CHILD, track.position, j) for j in range(g)
        ]).to(latents.device)
        out = self.step(
            latents.expand(g, *latents.shape[1:]), velocity.expand(g, *velocity.shape[1:]),
            torch.full((g,), track.sigma, device=latents.device), torch.full((g,), track.sigma_next, device=latents.device),
            noise=noise,
        )
        child_sigmas = coarsen_schedule(track.sigmas[track.position + 1 :], track.child_num_steps)
        first = (track.trajectory_index * len(track.branch_positions) + track.branch_positions.index(track.position)) * g
        children = []
        for j in range(g):
            rows.append(self._row(track, latents, _index_output(out, j), first + j, selection))
            children.append(_Track(out.next_latents[j : j + 1], child_sigmas, track.prompt_index, track.seed,
                                   "ode", sample_index=first + j))
        return children

    def _row(self, track: _Track, latents, out, sample_index: int, selection=None) -> dict:
        return {
            "selection": selection,
            "latents": latents,
            "next_latents": out.next_latents,
            "log_probs": out.log_prob,
            "sigmas": torch.tensor([track.sigma]),
            "sigmas_next": torch.tensor([track.sigma_next]),
            "prompt_index": torch.tensor([track.prompt_index]),
            "sample_index": torch.tensor([sample_index]),
            "step_index": torch.tensor([track.position]),
        }


def _index_output(out: StepOutput, j: int) -> StepOutput:
    return StepOutput(out.next_latents[j : j + 1], out.log_prob[j : j + 1], out.mean[j : j + 1], out.std[j : j + 1])
