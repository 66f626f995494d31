"""Retrieval inside the top cells: reference photos clustered by location (the index) and the GPS
gallery, scored per candidate cell."""
