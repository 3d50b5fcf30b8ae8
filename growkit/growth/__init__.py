"""Growth runs: ``grow()``, its run context, the growth-method registry, the Petridish round, the
jobs a round runs, the executors that run them and the gallery of models met on the way."""
