"""Pure resilience decisions: outcomes, backoff, retry, budget, ejection, breaker.

No I/O, no event loop, no clock or random source of their own: time and
randomness are passed in, so every decision is testable with a fake clock and
a seeded generator.
"""
