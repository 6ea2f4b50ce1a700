"""The contact run's steps: plan → extract → prepare (transform + quality gate) → load → report."""
