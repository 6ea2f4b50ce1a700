"""What analysts edit: the mapping tables, the settings, and how the CSV files are read."""
