"""lxt's benchmarks -- faithfulness (perturbation) and cost (time, memory) -- run as
``lxt bench faithfulness`` / ``lxt bench speed``.  Not part of the LRP library: ``import lxt``
never imports this package."""
