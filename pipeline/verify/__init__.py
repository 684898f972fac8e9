"""Verification: gates, the verification report (report.json/.md) and stability certificates."""
