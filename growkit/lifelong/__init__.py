"""Lifelong growth: ``Grower`` for a user's own training loop, ``grow_stream`` over a stream of
experiences, stream builders and continual-learning metrics."""
