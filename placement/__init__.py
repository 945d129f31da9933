"""Offline expert placement: statistics from routing traces in, a placement plan out."""
