"""The method contract, shared by the API and the worker: each method's spec and request schema, the job's
options and the job view. It imports neither side (nor torch): both import it."""
