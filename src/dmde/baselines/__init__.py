"""What the mixture is compared with (§V): the flat network, the ensemble of G flat models, early
fusion of the experts' features, the width-matched flat network."""
