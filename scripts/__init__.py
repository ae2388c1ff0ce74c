"""Operator scripts: a local deployment-engine federation, lab certificates, engine comparison."""
