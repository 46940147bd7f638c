"""Reading results: the report that answers a study's questions (`report`, `report_stats`), the pictures and
notes shown in optuna-dashboard (`curves`, `reconstruction_view`, `dashboard_notes`), and the replay of a
finished trial (`replay`)."""
