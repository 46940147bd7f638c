"""Reading results: the report that answers a study's questions (`report`, `report_stats`), the curves and
notes shown in optuna-dashboard (`curves`, `dashboard_notes`), and the replay of a
finished trial (`replay`)."""
