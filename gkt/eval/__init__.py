"""``gkt eval``: accuracy, speed and cost of teacher-only, student-only and gkt through the live edge API."""
