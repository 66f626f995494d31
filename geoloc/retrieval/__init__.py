"""Retrieval inside the top cells: cell-sorted tables, the one score fusion (``rerank``), the scorers
(prototypes of the reference-photo index, the GPS gallery, the evidence heads) and their artifacts."""
