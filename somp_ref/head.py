"""The type that names an attention head everywhere, in a module of its own so that the
modules below :mod:`somp_ref.head_scores` (the ranking files' reader, the demo) use it too
without importing what imports them."""

#: An attention head: (layer, head), both 0-based; heads are query heads.
Head = tuple[int, int]
