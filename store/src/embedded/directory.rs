//! Tenants, credentials and settings in the embedded store:
//! [`WorkspaceDirectory`] for [`EmbeddedStore`].

use super::*;

#[async_trait]
impl WorkspaceDirectory for EmbeddedStore {
    async fn create_workspace(
        &self,
        name: &str,
        write_key: Option<&str>,
        token: Option<&str>,
    ) -> Result<CreatedWorkspace> {
        let ks = &self.inner.ks;
        let created = CreatedWorkspace::new(name, write_key, token)?;
        let (workspace, source_id) = (&created.workspace, &created.source_id);
        let (write_key, token) = (&created.write_key, &created.token);
        let wkey = [b"w\0".as_slice(), write_key.as_bytes()].concat();
        let tkey = token_row(Scope::Admin, token);
        let _writer = self.inner.writer.lock().expect("writer lock");
        for kv in ks.workspaces.iter() {
            let (_, v) = kv.into_inner().map_err(unavailable)?;
            if from_json::<Workspace>(&v, "workspace row")?.name == name {
                return Err(StoreError::Conflict(format!("a workspace named {name:?}")));
            }
        }
        if ks.credentials.contains_key(&wkey).map_err(unavailable)? {
            return Err(StoreError::Conflict("write key".into()));
        }
        if ks.credentials.contains_key(&tkey).map_err(unavailable)? {
            return Err(StoreError::Conflict("token".into()));
        }
        let mut tx = self.inner.db.batch();
        tx.insert(&ks.workspaces, workspace.id.as_bytes(), json(workspace));
        tx.insert(
            &ks.credentials,
            wkey,
            json(&WriteGrant {
                workspace_id: workspace.id.clone(),
                source_id: source_id.clone(),
            }),
        );
        tx.insert(
            &ks.credentials,
            tkey,
            json(&ReadGrant {
                workspace_id: workspace.id.clone(),
                scope: Scope::Admin,
            }),
        );
        tx.commit().map_err(unavailable)?;
        self.persist()?;
        Ok(created)
    }

    async fn workspaces(&self) -> Result<Vec<Workspace>> {
        let snap = self.inner.db.snapshot();
        snap.iter(&self.inner.ks.workspaces)
            .map(|kv| {
                let (_, v) = kv.into_inner().map_err(unavailable)?;
                from_json(&v, "workspace row")
            })
            .collect()
    }

    async fn resolve_write_key(&self, write_key: &str) -> Result<Option<WriteGrant>> {
        let key = [b"w\0".as_slice(), write_key.as_bytes()].concat();
        match self.inner.ks.credentials.get(key).map_err(unavailable)? {
            Some(v) => Ok(Some(from_json(&v, "write grant")?)),
            None => Ok(None),
        }
    }

    async fn resolve_token(&self, token: &str) -> Result<Option<ReadGrant>> {
        for scope in [Scope::Admin, Scope::Read] {
            let key = token_row(scope, token);
            if let Some(v) = self.inner.ks.credentials.get(key).map_err(unavailable)? {
                let mut grant: ReadGrant = from_json(&v, "read grant")?;
                grant.scope = scope;
                return Ok(Some(grant));
            }
        }
        Ok(None)
    }

    async fn create_read_token(&self, workspace_id: &str) -> Result<String> {
        let token = new_secret("tmr_");
        let grant = ReadGrant {
            workspace_id: workspace_id.to_owned(),
            scope: Scope::Read,
        };
        self.inner
            .ks
            .credentials
            .insert(token_row(Scope::Read, &token), json(&grant))
            .map_err(unavailable)?;
        self.persist()?;
        Ok(token)
    }

    async fn identity_rules(&self, workspace_id: &str) -> Result<Option<RuleSettings>> {
        self.inner.stored_rules(workspace_id)
    }

    async fn set_identity_rules(&self, workspace_id: &str, rules: &RuleSettings) -> Result<()> {
        let checked =
            Rules::from_settings(rules).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.inner
            .ks
            .settings
            .insert(settings_key(workspace_id, "identity_rules"), json(rules))
            .map_err(unavailable)?;
        self.persist()?;
        self.inner
            .rules
            .write()
            .expect("rules lock")
            .insert(workspace_id.to_owned(), Arc::new(checked));
        Ok(())
    }

    async fn settings(&self, workspace_id: &str, prefix: &str) -> Result<Vec<(String, String)>> {
        let start = settings_key(workspace_id, prefix);
        let names_at = ws_key(workspace_id).len();
        let mut out = Vec::new();
        for kv in self.inner.ks.settings.prefix(&start) {
            let (k, v) = kv.into_inner().map_err(unavailable)?;
            let name =
                String::from_utf8(k[names_at..].to_vec()).map_err(|_| corrupt("setting name"))?;
            let value = String::from_utf8(v.to_vec()).map_err(|_| corrupt("setting value"))?;
            out.push((name, value));
        }
        Ok(out)
    }

    async fn put_setting(&self, workspace_id: &str, name: &str, value: Option<&str>) -> Result<()> {
        let key = settings_key(workspace_id, name);
        match value {
            Some(v) => self.inner.ks.settings.insert(key, v.as_bytes()),
            None => self.inner.ks.settings.remove(key),
        }
        .map_err(unavailable)?;
        self.persist()
    }
}

/// A token's `credentials` key: `t` (admin, as since the first layout) or
/// `r` (read only), NUL, its digest.
fn token_row(scope: Scope, token: &str) -> Vec<u8> {
    let prefix: &[u8] = match scope {
        Scope::Admin => b"t\0",
        Scope::Read => b"r\0",
    };
    [prefix, token_digest(token).as_bytes()].concat()
}

pub(super) fn settings_key(workspace_id: &str, name: &str) -> Vec<u8> {
    let mut key = ws_key(workspace_id);
    key.extend_from_slice(name.as_bytes());
    key
}
