#!/bin/sh
# certbot deploy hook (see docs/deploy.md): copy the renewed certificate of
# this server where the "postwarden" user can read it, then reload.
#   install -m 0755 deploy/certbot-deploy-hook.sh \
#       /etc/letsencrypt/renewal-hooks/deploy/postwarden.sh
set -eu
HOST="${POSTWARDEN_HOSTNAME:-$(hostname -f)}"
case " $RENEWED_DOMAINS " in *" $HOST "*) ;; *) exit 0 ;; esac
install -d -m 0750 -o root -g postwarden /etc/postwarden/tls
install -m 0644 -o root -g postwarden "$RENEWED_LINEAGE/fullchain.pem" /etc/postwarden/tls/cert.pem
install -m 0600 -o postwarden -g postwarden "$RENEWED_LINEAGE/privkey.pem" /etc/postwarden/tls/key.pem
systemctl reload postwarden
