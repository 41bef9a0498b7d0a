"""C-CDA R2.1 section entries -> FHIR R4 resources, one module per section.

:mod:`.dispatch` recognises a section (:func:`~.dispatch.section_kind`) and sends each entry to its
converter (:func:`~.dispatch.convert_entry`); the converters live in the module named after their
section: :mod:`.allergies`, :mod:`.problems`, :mod:`.medications`, :mod:`.results`, :mod:`.vitals`,
:mod:`.immunizations`, :mod:`.procedures`, :mod:`.encounters`, :mod:`.social` (with :mod:`.eicr`),
:mod:`.family`, :mod:`.plan`, :mod:`.goals`, :mod:`.payers`, :mod:`.notes`, :mod:`.equipment`.
:mod:`.observations` holds the Observation converter several of them use, :mod:`.entry` what all share.
Every converter returns the references of the resources it added, so the Composition section can
list them.
"""
