"""Matplotlib figures for the course: functions that return a Figure (one module per topic)."""
