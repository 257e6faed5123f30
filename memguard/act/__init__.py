"""Acting on an estimate: :mod:`.guard` is the one decision (capacity, estimate, plan, policy) that the
Lightning callback (:mod:`.callback`), the plain-loop preflight (:mod:`.preflight`), the transformers
callback (:mod:`memguard.integrations.hf`) and ``memguard check`` (:mod:`.check`) all make."""
