"""``make chaos``: the whole pipeline as separate processes against a local broker that is
stopped and restarted, with stages SIGKILLed at random moments and poison records in the input,
followed by a check that nothing was lost, duplicates are identifiable, poison is dead-lettered
and no personal value leaked anywhere it must not be.

``python -m chaos --help`` lists the options; :mod:`chaos.run` holds the orchestration and the
checks, :mod:`chaos.receiver` the recording webhook receiver, :mod:`chaos.poison` the bad input
and :mod:`chaos.scan` the personal-data search.
"""
