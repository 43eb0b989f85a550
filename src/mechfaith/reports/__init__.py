"""Pages and figures people look at: ``page`` (the one HTML skeleton, tables, embedded figures),
``values`` (the one number formatter), ``figures`` (matplotlib, imported only when drawing), and the
reports built on them: ``toy_report`` (+ ``plots``), ``faithfulness_report``, ``experiment_report``,
``dashboard`` and ``graph_viewer``."""
