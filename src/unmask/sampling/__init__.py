"""Sampling: iterative unmasking, block by block, with the trace recorded."""

from unmask.sampling.remasking import REMASKING
from unmask.sampling.rollout import Rollout
from unmask.sampling.sampler import CACHES, Sampler, SamplerConfig

__all__ = ["CACHES", "REMASKING", "Rollout", "Sampler", "SamplerConfig"]
