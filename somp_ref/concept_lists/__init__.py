"""Concept word lists shipped with somp_ref (one word or phrase a line, '#' comments).

Regenerate them with ``python -m somp_ref.concept_lists.build`` (maintainers only: it needs
the source packages named in each file's header, which are not dependencies).
"""
