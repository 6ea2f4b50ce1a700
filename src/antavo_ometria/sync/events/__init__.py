"""Event triggers: Antavo events → Ometria custom events (rules, delivery, report)."""
