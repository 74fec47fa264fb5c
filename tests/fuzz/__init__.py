"""Fuzzing the whole path a message takes, not a function: the AMQP properties as they come
off the wire, the body, decoding, authorization, validation, and the answer's encoding.

``target.one_delivery`` is the target; ``atheris_intake.py`` drives it with coverage
(atheris, libFuzzer), ``strategies`` builds structured hostile inputs for hypothesis, and
``seeds/`` holds the inputs that once crashed a worker, which every run tries first.
"""
