"""The MAR node: a DICOM storage SCP that corrects received CT series and sends the derived
series to a PACS (``mar-rt node``; see ``docs/node.md``).

Modules: ``config`` (settings), ``events`` (JSON-lines logs), ``spool`` (received files),
``completion`` (when a series is ready), ``scp`` (receiving), ``queue`` (durable runs),
``worker`` (the correcting process), ``sender`` (C-STORE SCU), ``service`` (all of it
together), ``status`` (``mar-rt node status``).  pynetdicom and the runtime are imported only
where they are used.
"""
