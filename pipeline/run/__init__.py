"""One cleaning run: plan, shard work (read -> decode -> sample -> encode -> write), verify, record, report.

The run object, :class:`~pipeline.run.run.Run`, holds a run resolved on its driver (models pinned, identity
computed) and its steps; three executors compose it: the local executor (:mod:`pipeline.run.local`), the Ray
job (:mod:`pipeline.jobs.clean`) and the Prefect flow (:mod:`flows.clean_dataset`). One idea per module:

=================  ==========================================================================================
``run``            the run object and its steps
``recipe``         the recipe resolved on the driver (models pinned), before it is hashed
``identity``       run id and config hash, from the pinned recipe alone
``models``         models checked, pinned (URI + fingerprint), loaded and verified
``preflight``      what is checked before any work: device, storage, priors
``plan``           the shards to clean, repeated ids, the check that not every row would be rejected
``rows``           rows decoded and checked, or rejected with a reason
``shard``          one shard's work, stage by stage, and its marker
``outputs``        the cleaned, metrics and errors tables: encoded and written
``judge``          the verdict on a recorded run: too many rejected rows fail it
``local``          the local executor
=================  ==========================================================================================

This package imports the floors below it (posterior, diffusion, data, metrics) and never ``pipeline.jobs``,
``flows`` or the CLI.
"""

from pipeline.run.run import Run, RunFailed, RunInterrupted

__all__ = ["Run", "RunFailed", "RunInterrupted"]
