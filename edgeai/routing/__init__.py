"""Which tier answers: routes, the local answer's confidence, remote providers, evaluation."""
